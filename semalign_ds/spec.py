"""The RunSpec: what a run is, resolved once from the config, both models' shapes and the world layout.

`semalign plan` (config.json shapes, --nodes x --gpus-per-node) and `run` / `teach` / `train` (the loaded models'
configs, the launch's ranks) build it with the same function, `resolve`, and read everything derived from the
config from it, so the plan and the run cannot disagree:
    method   the objectives and which teacher outputs they need (no teacher at all for SFT-like methods)
    roles    teacher and student ranks, ranks per node, nodes (the one rank layout of the project)
    budget   stages, steps and tokens per stage (run/budget.py)
    packets  every tensor a packet carries per token, its bytes, and the bytes of a sample
    store    where a rank keeps its packets: memory, disk, spool, or none (nothing to keep)
Pure Python: no torch, so `plan` and the checks stay fast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from semalign_ds.config import RunConfig, active_terms
from semalign_ds.planning.throughput import ModelShape
from semalign_ds.run import budget as budgetmod

def id_bytes(vocab: int) -> int:
    """Bytes per token id in the compact codec: the fewest that hold a vocabulary of `vocab` ids (1 to 4)."""
    return max(1, math.ceil(math.log2(max(vocab, 2)) / 8))


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "bool": 1, "uint8": 1, "int8": 1}


@dataclass(frozen=True)
class MethodSpec:
    """The objectives and what they need from the teacher (METHOD.md §4-5)."""

    layer_objective: str
    output_objective: str
    tau: float
    w_layer: float
    w_out: float
    w_label: float
    layer_balance: float | None
    log_grad_cosine: bool
    map: str
    target_kind: str  # residual (R_S vs the aligned residual) or state (h^(k) vs the aligned state)
    normalised_targets: bool  # M R_T / ||R_T|| per token; mse compares unnormalised M R_T
    needs_targets: bool  # the layer term is on: the teacher emits layer targets
    needs_logits: bool  # kl / uld: the teacher emits top-k (or full) logits
    needs_attribution: bool  # the critical layer is searched (targets travel and no manual pairing)

    @property
    def needs_teacher(self) -> bool:
        """Whether the run needs the teacher at all (SFT does not: it loads no teacher)."""
        return self.needs_targets or self.needs_logits

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "MethodSpec":
        m, terms = cfg.method, active_terms(cfg.method)
        targets = "layer" in terms
        return cls(m.layer_objective, m.output_objective, m.tau, m.w_layer, m.w_out, m.w_label, m.layer_balance,
                   m.log_grad_cosine, m.map, "state" if m.layer_objective == "fisher_logits" else "residual",
                   m.layer_objective != "mse", targets, "out" in terms and m.output_objective in ("kl", "uld"),
                   targets and cfg.pairing.critical_layer and cfg.pairing.manual is None)


@dataclass(frozen=True)
class Roles:
    """Which global ranks run the teacher and which the student, and how ranks sit on nodes.

    colocated / spool: every rank does both (teacher ZeRO-3 shard + student ZeRO-2 replica).
    disaggregated: the first `teacher_ranks` ranks are teacher ranks, the rest student ranks; any ratio.
    Ranks fill nodes in order, `ranks_per_node` to a node (the launchers' block distribution).
    """

    world_size: int
    teacher_ranks: tuple[int, ...]
    student_ranks: tuple[int, ...]
    ranks_per_node: int = 1

    @classmethod
    def build(cls, topology: str, world_size: int, teacher_ranks: int | None = None,
              ranks_per_node: int | None = None) -> "Roles":
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        per_node = max(1, min(ranks_per_node or world_size, world_size))
        everyone = tuple(range(world_size))
        if topology in ("colocated", "spool"):
            if teacher_ranks not in (None, world_size):
                raise ValueError(f"transport.teacher_ranks={teacher_ranks} only applies to runtime.topology="
                                 f"disaggregated; with {topology} every rank is a teacher and a student rank")
            return cls(world_size, everyone, everyone, per_node)
        if topology != "disaggregated":
            raise ValueError(f"runtime.topology must be colocated, disaggregated or spool, got {topology!r}")
        if teacher_ranks is None:
            raise ValueError("runtime.topology=disaggregated needs transport.teacher_ranks (how many of the "
                             f"{world_size} ranks run the teacher; e.g. transport.teacher_ranks="
                             f"{max(1, world_size // 2)})")
        if not 1 <= teacher_ranks < world_size:
            raise ValueError(f"transport.teacher_ranks={teacher_ranks} must leave at least one rank of the "
                             f"{world_size} for the student (1..{world_size - 1}); launch more tasks or lower it")
        return cls(world_size, everyone[:teacher_ranks], everyone[teacher_ranks:], per_node)

    @property
    def disaggregated(self) -> bool:
        return self.teacher_ranks != self.student_ranks

    @property
    def nodes(self) -> int:
        return -(-self.world_size // self.ranks_per_node)

    def is_teacher(self, rank: int) -> bool:
        return rank in self.teacher_ranks

    def is_student(self, rank: int) -> bool:
        return rank in self.student_ranks

    def per_node(self, ranks: tuple[int, ...]) -> int:
        """The most of `ranks` on any one node."""
        counts: dict[int, int] = {}
        for r in ranks:
            counts[r // self.ranks_per_node] = counts.get(r // self.ranks_per_node, 0) + 1
        return max(counts.values(), default=0)


@dataclass(frozen=True)
class PacketLayout:
    """Every tensor one sample's packet carries in its codec (transport/codec.py), per token, and its bytes.

    lossless (the schema's flat names): ids (int64) and mask (bool) per token, sample_ids (int64) per sample;
    target.{k} per trained layer (`width` wide: D_S, or D_T with method.map none; method.target_dtype); top_values
    (float32, K) + top_idx (int32, K; not for uld) + tail (float32), or full_logits (float32, V) with top_k 0;
    state_mask + out_mask (bool) across tokenizers.
    compact: ids in `id_bytes`; per layer `rank` int8 coefficients + a float16 scale (target_bits 8) or `rank`
    float16 (16); top-k values uint8 + a float16 scale (logit_bits 8) or float16; top-k ids in `id_bytes`; tail
    float16. `rank` is transport.target_rank: with an energy threshold a layer may keep fewer (an upper bound).
    """

    seq_len: int
    layers: tuple[int, ...]
    width: int
    target_dtype: str
    top_k: int
    vocab: int
    targets: bool
    logits: bool
    logit_ids: bool
    cross: bool
    codec: str = "lossless"
    rank: int = 0
    target_bits: int = 8
    logit_bits: int = 8
    id_bytes: int = 8

    def tensors(self) -> list[tuple[str, str, int]]:
        """(flat name, dtype, elements per token) of every per-token tensor, in schema order."""
        if self.codec == "compact":
            return self._compact()
        out = [("ids", "int64", 1), ("mask", "bool", 1)]
        if self.targets:
            out += [(f"target.{k}", self.target_dtype, self.width) for k in self.layers]
        if self.logits and self.top_k:
            out += [("top_values", "float32", self.top_k), ("tail", "float32", 1)]
            out += [("top_idx", "int32", self.top_k)] if self.logit_ids else []
        elif self.logits:
            out += [("full_logits", "float32", self.vocab)]
        return out + self._masks()

    def _compact(self) -> list[tuple[str, str, int]]:
        out = [("ids.packed", "uint8", self.id_bytes), ("mask", "bool", 1)]
        if self.targets:
            for k in self.layers:
                rank = min(self.rank, self.width)
                out += ([(f"target.{k}.q", "int8", rank), (f"target.{k}.scale", "float16", 1)]
                        if self.target_bits == 8 else [(f"target.{k}.c16", "float16", rank)])
        if self.logits and self.top_k:
            out += ([("top_values.q", "uint8", self.top_k), ("top_values.scale", "float16", 1)]
                    if self.logit_bits == 8 else [("top_values.f16", "float16", self.top_k)])
            out += [("tail.f16", "float16", 1)]
            out += [("top_idx.packed", "uint8", self.top_k * self.id_bytes)] if self.logit_ids else []
        elif self.logits:
            out += [("full_logits", "float32", self.vocab)]
        return out + self._masks()

    def _masks(self) -> list[tuple[str, str, int]]:
        return [("state_mask", "bool", 1), ("out_mask", "bool", 1)] if self.cross and (self.targets or
                                                                                        self.logits) else []

    def parts(self) -> dict[str, int]:
        """Bytes per token by part: tokens (ids + mask), targets, logits (values + tail, or full), logit_ids,
        masks (the cross-tokenizer masks)."""
        part = {"ids": "tokens", "mask": "tokens", "top_values": "logits", "tail": "logits", "full_logits": "logits",
                "top_idx": "logit_ids", "state_mask": "masks", "out_mask": "masks"}
        out = {"tokens": 0, "targets": 0, "logits": 0, "logit_ids": 0, "masks": 0}
        for name, dtype, n in self.tensors():
            out[part.get(name.split(".")[0], "targets")] += n * DTYPE_BYTES[dtype]
        return out

    @property
    def bytes_per_token(self) -> int:
        return sum(self.parts().values())

    @property
    def bytes_per_sample(self) -> int:
        return self.seq_len * self.bytes_per_token + DTYPE_BYTES["int64"]  # + the sample id


def store_kind(cfg: RunConfig, method: MethodSpec, bytes_per_rank: float, ram_per_node: float,
               student_ranks_per_node: int) -> str:
    """Where a rank keeps its packets between the one teacher pass and the stages: `none` (no teacher output),
    `spool` (a spool job), transport.store, or for auto: memory when the node's student ranks' packets fit in
    transport.store_memory_fraction of its RAM, else disk."""
    if cfg.runtime.topology == "spool":
        return "spool"
    if not method.needs_teacher:
        return "none"
    if cfg.transport.store != "auto":
        return cfg.transport.store
    share = cfg.transport.store_memory_fraction * ram_per_node / max(student_ranks_per_node, 1)
    return "memory" if bytes_per_rank <= share else "disk"


def scope_of(cfg: RunConfig) -> str:
    """transport.scope resolved: run (keep every packet for the whole run) or window (teach, train, drop).

    auto: the full colocated schedule reads each sample in one stage, so a window costs no extra teacher pass and
    bounds the store; the frontier schedule revisits every sample in every stage, where a window would cost a
    teacher pass per stage against a stored pass that the compact codec keeps small (the flagship plan: 0.8 GiB
    against +15 passes per sample), so auto keeps the stored pass. `semalign plan` prints both costs; a user short
    of host memory or disk sets transport.scope: window."""
    if cfg.transport.scope != "auto":
        return cfg.transport.scope
    full_colocated = cfg.schedule.mode == "full" and cfg.runtime.topology == "colocated"
    return "window" if full_colocated else "run"


@dataclass(frozen=True)
class RunSpec:
    cfg: RunConfig
    teacher: ModelShape
    student: ModelShape
    method: MethodSpec
    roles: Roles
    budget: budgetmod.Budget
    packets: PacketLayout
    store: str
    num_sequences: int
    scope: str = "run"

    @property
    def windowed(self) -> bool:
        return self.scope == "window" and self.method.needs_teacher

    @property
    def teacher_passes_per_sample(self) -> float:
        """Teacher forwards per transfer sample over the run (fit window and attribution apart): one, or one per
        stage when a windowed store teaches every stage afresh."""
        if not self.method.needs_teacher:
            return 0.0
        return float(len(self.budget.stages)) if self.windowed else 1.0

    @property
    def trained_layers(self) -> list[int]:
        return sorted({l for s in self.budget.stages for l in s.layers})

    @property
    def samples_per_student_rank(self) -> int:
        """The most samples one student rank owns (data.owned_samples: i % W == r)."""
        return -(-self.num_sequences // len(self.roles.student_ranks))

    @property
    def store_bytes_per_rank(self) -> int:
        """The most packet bytes one student rank holds at a time (a windowed store: one window)."""
        if self.store == "none":
            return 0
        held = self.budget.windows.size if self.windowed else self.samples_per_student_rank
        return held * self.packets.bytes_per_sample

    @property
    def total_packet_bytes(self) -> int:
        return 0 if self.store == "none" else self.num_sequences * self.packets.bytes_per_sample

    def describe(self) -> list[str]:
        """The plan a run prints at its start (and `plan` shows the same figures)."""
        where = {"memory": "host memory of each rank", "disk": "a local spool per rank", "spool": "the spool",
                 "none": "nowhere (the method needs no teacher output)"}[self.store]
        lines = self.budget.describe()
        if self.windowed:
            w = self.budget.windows
            lines.append(f"teacher passes per sample: {self.teacher_passes_per_sample:g} (windowed store: each "
                         f"stage teaches {w.count} window(s) of <= {w.size} sequences per rank, trains "
                         f"{w.micro_batches} micro-batches on each, then drops it)")
        elif self.method.needs_teacher:
            lines.append(f"teacher passes per sample: 1 (one teacher forward per transfer sample; "
                         f"{len(self.budget.stages)} stage(s) train from its packets)")
        else:
            lines.append("no teacher: the method needs no teacher output (no teacher load, no attribution)")
        parts = ", ".join(f"{k} {v:,}" for k, v in self.packets.parts().items() if v)
        lines.append(f"packets ({self.packets.codec}): {self.packets.bytes_per_token:,} bytes per token ({parts}); "
                     f"at most {self.store_bytes_per_rank / 2**20:,.1f} MiB per student rank in {where}")
        return lines

    def params(self) -> dict:
        """The spec as MLflow params (`plan.*`)."""
        first = self.budget.stages[0]
        return {"plan.stages": [s.k for s in self.budget.stages], "plan.steps_per_stage": first.steps,
                "plan.tokens_per_stage": first.tokens, "plan.epochs_per_stage": round(first.epochs, 4),
                "plan.teacher_passes_per_sample": self.teacher_passes_per_sample, "plan.scope": self.scope,
                "plan.codec": self.packets.codec,
                "plan.store": self.store, "plan.store_bytes": self.store_bytes_per_rank,
                "plan.bytes_per_token": self.packets.bytes_per_token, "plan.needs_teacher": self.method.needs_teacher,
                "plan.teacher_ranks": len(self.roles.teacher_ranks),
                "plan.student_ranks": len(self.roles.student_ranks), "plan.nodes": self.roles.nodes}


def packet_layout(cfg: RunConfig, method: MethodSpec, teacher: ModelShape, student: ModelShape, seq_len: int,
                  layers: list[int], cross: bool) -> PacketLayout:
    width = teacher.hidden if method.map == "none" else student.hidden
    t = cfg.transport
    return PacketLayout(seq_len, tuple(layers), width, cfg.method.target_dtype, cfg.method.top_k, teacher.vocab,
                        method.needs_targets, method.needs_logits, method.output_objective != "uld", cross, t.codec,
                        t.target_rank, t.target_bits, t.logit_bits, id_bytes(student.vocab))


def resolve(cfg: RunConfig, teacher: ModelShape, student: ModelShape, roles: Roles, num_sequences: int,
            ram_per_node: float, cross: bool = False) -> RunSpec:
    """The RunSpec of `cfg` on `roles` with `num_sequences` transfer sequences (data.max_sequences for a plan;
    the packed count in a run) and `ram_per_node` bytes of host RAM per node (the profile's for a plan; the
    node's physical RAM in a run). `cross`: the tokenizers differ (the packets carry the alignment masks)."""
    method, scope = MethodSpec.from_config(cfg), scope_of(cfg)
    plan = budgetmod.budget(cfg, student.layers, num_sequences, len(roles.student_ranks),
                            windowed=scope == "window" and method.needs_teacher)
    layers = sorted({l for s in plan.stages for l in s.layers})
    packets = packet_layout(cfg, method, teacher, student, cfg.data.seq_len, layers, cross)
    held = plan.windows.size if plan.windows else -(-num_sequences // len(roles.student_ranks))
    store = store_kind(cfg, method, held * packets.bytes_per_sample, ram_per_node,
                       roles.per_node(roles.student_ranks))
    return RunSpec(cfg, teacher, student, method, roles, plan, packets, store, num_sequences, scope)
