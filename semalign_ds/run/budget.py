"""The stage budget: how much each stage trains, in epochs or tokens, so that 1 rank and 128 do the same work.

With N transfer sequences, W student ranks, micro-batch B and gradient accumulation GA:
    schedule.epochs_per_stage E   -> ceil(E * N / (B * W * GA)) optimizer steps per stage (E * N sequences)
    schedule.tokens_per_stage K   -> ceil(K / (B * T * W * GA)) optimizer steps per stage (T = data.seq_len)
Each rank draws its micro-batches epoch after epoch from its own samples (data.micro_batch_ids: P = (N // W) // B
full micro-batches per rank-epoch), so the stage sees E * N sequences, rounded up to whole optimizer steps, on
any number of ranks.
schedule.mode full (the baselines) trains every listed layer in one stage for the frontier's total budget.
Windowed stores (transport.scope window, `windows`): each rank splits its samples into C windows of nearly equal
size n (at most transport.window_sequences); a window is taught, trained for ceil(E * n_max / B) micro-batches
(n_max: the largest window of any rank, so every rank steps in lockstep) and dropped; the stage's micro-batches are
C times that, rounded up to whole optimizer steps.
Nothing is capped: the numbers here are what the run trains, printed and logged at its start (`describe`) and
used by `semalign plan`, so the plan and the run agree by construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from semalign_ds.config import RunConfig


def micro_batches_per_epoch(num_sequences: int, micro_batch: int, world: int) -> int:
    """Full micro-batches per rank per epoch: every rank draws the same number, (N // world) // micro_batch."""
    per_rank = num_sequences // world
    if micro_batch < 1 or per_rank < micro_batch:
        raise ValueError(f"the transfer data has {num_sequences} sequences: {per_rank} per rank over {world} "
                         f"rank(s), fewer than one micro-batch of {micro_batch}; add data (data.max_sequences) or "
                         f"lower data.micro_batch_size")
    return per_rank // micro_batch


@dataclass(frozen=True)
class Windows:
    """How a windowed stage walks a rank's samples: `count` windows of at most `size` samples (every rank the
    same count; sizes differ by at most one), `micro_batches` per window."""

    count: int
    size: int
    micro_batches: int


def windows(num_sequences: int, world: int, micro_batch: int, window_sequences: int, epochs: float) -> Windows:
    own_max = -(-num_sequences // world)
    if num_sequences // world < micro_batch:
        micro_batches_per_epoch(num_sequences, micro_batch, world)  # the same clear error
    count = max(1, round(own_max / window_sequences))
    while -(-own_max // count) > window_sequences:
        count += 1
    size = -(-own_max // count)
    return Windows(count, size, max(1, math.ceil(epochs * size / micro_batch - 1e-9)))


@dataclass(frozen=True)
class Stage:
    k: int  # stage id (the frontier layer; schedule.mode full: the last listed layer)
    layers: tuple[int, ...]  # trainable student layers (1-indexed)
    steps: int  # optimizer steps
    micro_batches: int  # per rank: steps * GA
    sequences: int  # over all ranks: micro_batches * B * W
    tokens: int  # token positions over all ranks: sequences * seq_len
    epochs: float  # sequences / N


@dataclass(frozen=True)
class Budget:
    stages: tuple[Stage, ...]
    num_sequences: int
    world: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    per_epoch: int  # micro-batches per rank per epoch
    windows: Windows | None = None  # a windowed store (transport.scope window)

    @property
    def used_per_epoch(self) -> int:
        """Sequences a rank-epoch round draws (every rank the same number of full micro-batches)."""
        return self.per_epoch * self.micro_batch * self.world

    def stage(self, k: int) -> Stage:
        return next(s for s in self.stages if s.k == k)

    def describe(self) -> list[str]:
        """The plan a run prints and logs at its start."""
        first = self.stages[0]
        lines = [f"{len(self.stages)} stage(s) {[s.k for s in self.stages]}; each: {first.steps} optimizer steps = "
                 f"{first.micro_batches} micro-batches of {self.micro_batch} per rank x {self.world} rank(s) = "
                 f"{first.sequences:,} sequences, {first.tokens:,} token positions, {first.epochs:.2f} epochs of "
                 f"{self.num_sequences:,} sequences"]
        if self.used_per_epoch < self.num_sequences:
            lines.append(f"each rank draws full micro-batches of its own samples: a round over all ranks covers "
                         f"{self.used_per_epoch:,} of the {self.num_sequences:,} sequences; the other "
                         f"{self.num_sequences - self.used_per_epoch} come up in the next round's order")
        return lines


def stage_list(cfg: RunConfig, L_S: int) -> list[int]:
    stages = cfg.schedule.stages or list(range(1, L_S + 1))
    bad = [k for k in stages if not 1 <= k <= L_S]
    if bad:
        raise ValueError(f"schedule.stages {bad} out of range: the student has layers 1..{L_S}")
    if stages != sorted(set(stages)):
        raise ValueError(f"schedule.stages {stages} must be increasing (shallow to deep) without repeats")
    return stages


def steps_per_stage(cfg: RunConfig, num_sequences: int, world: int) -> int:
    s, d = cfg.schedule, cfg.data
    if s.tokens_per_stage is not None:
        return max(1, math.ceil(s.tokens_per_stage / (d.micro_batch_size * d.seq_len * world * s.grad_accum)))
    micro_batches_per_epoch(num_sequences, d.micro_batch_size, world)  # at least one micro-batch per rank
    per_step = d.micro_batch_size * world * s.grad_accum
    return max(1, math.ceil(s.epochs_per_stage * num_sequences / per_step - 1e-9))


def stage_epochs(cfg: RunConfig, num_sequences: int) -> float:
    """Passes over the transfer set per stage (schedule.tokens_per_stage as the epochs it amounts to)."""
    s, d = cfg.schedule, cfg.data
    return s.epochs_per_stage if s.tokens_per_stage is None else s.tokens_per_stage / (num_sequences * d.seq_len)


def budget(cfg: RunConfig, L_S: int, num_sequences: int, world: int, windowed: bool = False) -> Budget:
    """The stages of a run with `num_sequences` transfer sequences on `world` student ranks (`windowed`: taught
    and trained window by window, see the module docstring)."""
    stages = stage_list(cfg, L_S)
    d, ga, full = cfg.data, cfg.schedule.grad_accum, cfg.schedule.mode == "full"
    win = None
    if windowed:  # one stage of full mode carries every layer's budget
        epochs = stage_epochs(cfg, num_sequences) * (len(stages) if full else 1)
        win = windows(num_sequences, world, d.micro_batch_size, cfg.transport.window_sequences, epochs)
        stage_steps = -(-win.count * win.micro_batches // ga)
    else:
        stage_steps = steps_per_stage(cfg, num_sequences, world) * (len(stages) if full else 1)
    plan = [(stages[-1], tuple(stages), stage_steps)] if full else [(k, (k,), stage_steps) for k in stages]
    out = []
    for k, layers, n in plan:
        sequences = n * ga * d.micro_batch_size * world
        out.append(Stage(k, layers, n, n * ga, sequences, sequences * d.seq_len, sequences / num_sequences))
    return Budget(tuple(out), num_sequences, world, d.micro_batch_size, ga, d.seq_len,
                  micro_batches_per_epoch(num_sequences, d.micro_batch_size, world), win)


def stage_seed(cfg: RunConfig, k: int) -> int:
    """The data-order seed of stage k (each stage draws its own order)."""
    return cfg.seed + k
