"""Where the student's packets come from: one teacher pass per transfer sample in every topology.

colocated      `teach_local`: every rank runs its ZeRO-3 teacher shard once over its own samples (data.owned_samples;
               lockstep, a spare forward where a rank has one micro-batch fewer) into its packet store (memory or a
               local spool, transport/store.py); every stage then trains from the store.
disaggregated  teacher ranks (`serve_stream`) emit every sample once, in the order the first stage's first epoch
               consumes them, to the student rank that owns it; a student rank's StreamStore keeps each packet as it
               arrives, trains on it at once when it is the micro-batch due (so teacher and student overlap), and
               reads later epochs and stages back from its store. A restarted job streams again (counted).
spool          `write_spool` (`semalign teach`): one pass over all samples into shards; a student job reads rows
               by sample id (SpoolReader is its store).
The student loop sees one interface, `Feed.source(k, layers, start, steps)`: this rank's micro-batches
start*GA .. steps*GA-1 of stage k in the rank-partitioned order (data.micro_batch_ids), the same in every
topology, so the three end with the same weights.
Legend: GA gradient accumulation steps, B micro-batch, S student ranks, T teacher ranks, N transfer samples.
"""
from __future__ import annotations

import dataclasses
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from semalign_ds import data as datamod
from semalign_ds.cluster.distributed import DistInfo, all_reduce, barrier
from semalign_ds.method.pairing import PairingTable
from semalign_ds.models.loading import torch_dtype
from semalign_ds.progress import bar
from semalign_ds.run import signals, supervision
from semalign_ds.run.budget import stage_seed
from semalign_ds.spec import Roles
from semalign_ds.transport import schema, spool, store as storemod, stream
from semalign_ds.transport.codec import Codec
from semalign_ds.transport.packet import SupervisionPacket

if TYPE_CHECKING:
    from semalign_ds.config import RunConfig
    from semalign_ds.run.context import RunContext


class Feed:
    """A stage's packets for this rank from a store: each read moves the stored (encoded) tensors to the student's
    device and decodes them there; counts the bytes read and the tokens the student received."""

    def __init__(self, ctx: RunContext, store, kind: str, codec: Codec, check_tokens: bool = False):
        self.ctx, self.store, self.kind, self.codec, self.check_tokens = ctx, store, kind, codec, check_tokens
        self.target_dtype = torch_dtype(ctx.cfg.method.target_dtype)
        self.bytes = self.tokens = 0

    def source(self, k: int, layers: list[int], start: int, steps: int):
        cfg, info, ga = self.ctx.cfg, self.ctx.info, self.ctx.cfg.schedule.grad_accum
        N, B = len(self.ctx.blocks), cfg.data.micro_batch_size
        for index in range(start * ga, steps * ga):
            ids = datamod.micro_batch_ids(N, B, info.world_size, info.rank, stage_seed(cfg, k), index)
            yield self.read(self.store, ids, layers)

    def read(self, store, ids: torch.Tensor, layers: list[int]) -> SupervisionPacket:
        """The packet of these samples from `store`: its encoded tensors moved to the student's device, decoded
        there."""
        flat = store.flat(ids, layers)
        self.bytes += schema.flat_nbytes(flat)
        flat = {name: t.to(self.ctx.info.device, non_blocking=True) for name, t in flat.items()}
        packet = schema.packet_from_flat(self.codec.decode(flat, self.target_dtype))
        if self.check_tokens and not torch.equal(packet.ids_BT.cpu(), self.ctx.blocks.ids_NT[ids]):
            raise ValueError(f"the spool's tokens for samples {ids.tolist()} differ from this run's data; "
                             f"the spool was written from other data")
        self.tokens += packet.num_tokens
        return with_answers(packet, self.ctx.blocks)

    def stats(self) -> dict:
        return {f"transport/{self.kind}_bytes_per_token": self.bytes / max(self.tokens, 1),
                f"transport/{self.kind}_bytes": float(self.bytes)}


class WindowFeed(Feed):
    """A colocated windowed store (transport.scope window): a stage's micro-batches window by window (budget
    `windows`, data.window_samples); a window is taught when its first micro-batch is due (every rank at the same
    index: ZeRO-3 lockstep), trained on, then dropped, so the store never holds more than one window. A run
    resumed inside a window teaches that window again (counted in teacher_passes_per_sample)."""

    def __init__(self, ctx: RunContext, progress, recipes: dict, M_DsDt, codec: Codec, binding: dict):
        super().__init__(ctx, None, "window", codec)
        self.progress, self.recipes, self.M, self.binding = progress, recipes, M_DsDt, binding
        self.taught = self.passes = 0
        self.teach_s = self.peak_bytes = self.stored_bytes = self.stored_positions = 0.0

    def source(self, k: int, layers: list[int], start: int, steps: int):
        cfg, info, ga = self.ctx.cfg, self.ctx.info, self.ctx.cfg.schedule.grad_accum
        B, win, seed = cfg.data.micro_batch_size, self.ctx.spec.budget.windows, stage_seed(cfg, k)
        windows = datamod.window_samples(len(self.ctx.blocks), info.world_size, info.rank, seed, win.count)
        current, store = None, None
        try:
            for index in range(start * ga, steps * ga):
                w = min(index // win.micro_batches, win.count - 1)  # the last window takes the rounding's extra
                if w != current:
                    if store is not None:
                        store.remove()
                    current, store = w, self._teach(windows[w], w)
                ids = datamod.window_micro_batch_ids(windows[w], w, B, info.rank, seed, index - w * win.micro_batches)
                yield self.read(store, ids, layers)
        finally:
            if store is not None:
                store.remove()

    def _teach(self, samples: torch.Tensor, w: int):
        """Teach one window into a fresh store (collective: every rank the same number of forwards)."""
        t0, B = time.perf_counter(), self.ctx.cfg.data.micro_batch_size
        kind = self.ctx.spec.store
        store = storemod.MemoryStore(len(self.ctx.blocks), len(samples)) if kind == "memory" else \
            storemod.DiskStore(rank_store_dir(self.ctx.cfg, self.ctx.out, self.ctx.info.rank).with_name(
                f"rank-{self.ctx.info.rank:05d}-window"),
                               self.binding, len(self.ctx.blocks), len(samples), self.ctx.cfg.transport.shard_sequences,
                               self.codec)
        for i in range(-(-self.ctx.spec.budget.windows.size // B)):
            ids = samples[i * B:(i + 1) * B]
            packet = supervision.emit(self.ctx, datamod.take(self.ctx.blocks, ids if len(ids) else samples[:1]),
                                      self.recipes, self.M)
            self.passes += 1
            if len(ids):  # else a spare forward: ZeRO-3's lockstep with a rank whose window is one larger
                store.put(encoded(self.codec, packet))
        store.finish()
        taught = int(all_reduce([len(samples)], self.ctx.info.device, self.ctx.group)[0])
        self.progress.teacher_samples += taught  # every rank's: checkpoints carry the count
        self.taught += taught
        self.peak_bytes = max(self.peak_bytes, store.nbytes)
        self.stored_bytes += store.nbytes
        self.stored_positions += len(samples) * self.ctx.blocks.seq_len
        self.teach_s += time.perf_counter() - t0
        return store

    def stats(self) -> dict:
        return {**super().stats(), "store_peak_bytes": float(self.peak_bytes), "teach/seconds": self.teach_s,
                "packet_bytes_per_token": self.stored_bytes / max(self.stored_positions, 1.0)}


class LabelStore:
    """The packets of a method that needs no teacher output (e.g. SFT): the transfer data's own tokens."""

    kind = "data"

    def __init__(self, blocks: datamod.TokenBlocks):
        self.blocks = blocks

    def flat(self, sample_ids_B: torch.Tensor, layers) -> dict[str, torch.Tensor]:
        return {"ids": self.blocks.ids_NT[sample_ids_B], "mask": self.blocks.mask_NT[sample_ids_B],
                "sample_ids": sample_ids_B}


def with_answers(packet: SupervisionPacket, blocks: datamod.TokenBlocks) -> SupervisionPacket:
    """The packet with the student's answer mask of its samples attached (conversation data: blocks.loss_mask_NT);
    unchanged for plain text. The mask comes from this rank's own packed data, so it never travels."""
    if blocks.loss_mask_NT is None:
        return packet
    rows = blocks.loss_mask_NT[packet.sample_ids_B.cpu()]
    return dataclasses.replace(packet, loss_mask_BT=rows.to(packet.mask_BT.device))


# ---------------------------------------------------------------- the local store (colocated, disaggregated)


def store_dir(cfg: RunConfig, out: Path) -> Path:
    return Path(cfg.transport.store_dir) if cfg.transport.store_dir else Path(out) / "packets"


def rank_store_dir(cfg: RunConfig, out: Path, rank: int) -> Path:
    """Where rank `rank` keeps a disk packet store."""
    return store_dir(cfg, out) / f"rank-{rank:05d}"


def open_store(ctx: RunContext, binding: dict, kind: str, codec: Codec):
    """This rank's store for its own samples (a disk store resumes what an interrupted run committed)."""
    N, info = len(ctx.blocks), ctx.info
    capacity = len(datamod.owned_samples(N, info.rank, info.world_size))
    if kind == "memory":
        return storemod.MemoryStore(N, capacity)
    directory = rank_store_dir(ctx.cfg, ctx.out, info.rank)
    return storemod.DiskStore(directory, binding, N, capacity, ctx.cfg.transport.shard_sequences, codec)


def teach_local(ctx: RunContext, store, recipes: dict, M_DsDt, codec: Codec) -> dict:
    """Colocated teach phase: this rank's samples not yet in its store, through the teacher once. Returns this
    rank's counts: samples emitted, samples restored from an interrupted run's disk store, real tokens emitted and
    forwards (spares included)."""
    info, B = ctx.info, ctx.cfg.data.micro_batch_size
    own = datamod.owned_samples(len(ctx.blocks), info.rank, info.world_size)
    todo = store.missing(own)
    rounds = int(all_reduce([-(-len(todo) // B)], info.device, ctx.group, op="max")[0])
    for i in bar(range(rounds), "teacher pass (once per sample)", ctx):
        ids = todo[i * B:(i + 1) * B]
        if len(ids):
            store.put(encoded(codec, supervision.emit(ctx, datamod.take(ctx.blocks, ids), recipes, M_DsDt)))
        else:  # keep ZeRO-3's lockstep with ranks that have one micro-batch more
            supervision.emit(ctx, datamod.take(ctx.blocks, own[:1]), recipes, M_DsDt)
    store.finish()
    return {"samples": len(todo), "restored": len(own) - len(todo), "tokens": int(ctx.blocks.mask_NT[todo].sum()),
            "passes": rounds}


# ---------------------------------------------------------------- spool


def write_spool(ctx: RunContext, recipes: dict, M_DsDt, binding: dict, stages: list[int], codec: Codec) -> dict:
    """Every teacher rank writes whole shards (pending shards dealt round-robin; ZeRO-3 lockstep kept by spare
    forwards); rank 0 writes the manifest once all are committed. Resumes an interrupted spool. Returns the
    manifest (rank 0) with this run's counts: samples emitted, seconds."""
    cfg = ctx.cfg
    plan = spool.open_plan(Path(cfg.transport.spool_dir), binding, len(ctx.blocks), cfg.transport.shard_sequences,
                           stages)
    if ctx.info.is_main:
        spool.write_codec(plan.directory, codec)
    barrier(ctx.group)
    pending = plan.pending()
    barrier(ctx.group)  # every rank saw the same committed shards before anyone writes
    world, rank = ctx.info.world_size, ctx.info.rank
    per_shard = -(-plan.shard_rows // cfg.data.micro_batch_size)
    t0, emitted = time.perf_counter(), 0
    rounds = bar(range(0, len(pending), world), "spool shards", ctx, unit="round")
    for first in signals.graceful_steps(rounds, None, ctx.group, ctx.info.device):  # committed shards: the resume
        j = pending[first + rank] if first + rank < len(pending) else None
        emitted += _write_shard(ctx, plan, j, per_shard, recipes, M_DsDt, codec, spare=world > 1)
    barrier(ctx.group)
    extra = {"teacher_passes_per_sample": 1.0, "seq_len": ctx.blocks.seq_len, "top_k": cfg.method.top_k,
             "target_dtype": cfg.method.target_dtype,
             "planned_bytes_per_token": ctx.spec.packets.bytes_per_token, "codec": codec.describe()}
    manifest = spool.write_manifest(plan, extra) if ctx.info.is_main else {}
    barrier(ctx.group)
    emitted = int(all_reduce([emitted], ctx.info.device, ctx.group)[0])
    return {**manifest, "emitted_samples": emitted, "spool_write_s": time.perf_counter() - t0,
            "shards_written": len(pending)}


def _write_shard(ctx: RunContext, plan: spool.SpoolPlan, j: int | None, per_shard: int, recipes: dict, M, codec: Codec,
                 spare: bool) -> int:
    micro, emitted = ctx.cfg.data.micro_batch_size, 0
    first, n = plan.rows_of(j) if j is not None else (0, 0)
    shard = None
    try:
        for m in range(per_shard):
            a = m * micro
            if a >= n:
                if spare:  # keep ZeRO-3's lockstep with the ranks still writing
                    supervision.emit(ctx, datamod.take(ctx.blocks, torch.arange(1)), recipes, M)
                continue
            ids = torch.arange(first + a, first + min(n, a + micro))
            flat = encoded(codec, supervision.emit(ctx, datamod.take(ctx.blocks, ids), recipes, M))
            emitted += len(ids)
            if shard is None:
                layout = [[name, dtype, [n] + shape[1:]] for name, dtype, shape in schema.layout_of(flat)]
                shard = spool.ShardFile(plan.directory, j, layout, plan.metadata(j))
            shard.write(a, flat)
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    if shard is not None:
        shard.commit(first)
    return emitted


def spool_pairing(ctx: RunContext, reader: spool.SpoolReader) -> PairingTable:
    """The spool's pairing table, checked against the hash its manifest binds the targets to."""
    path = reader.directory / spool.PAIRING
    if not path.is_file():
        raise ValueError(f"the spool in {str(reader.directory)!r} lacks {spool.PAIRING}; rerun `semalign teach`")
    table = PairingTable.from_json(path.read_text())
    kind = ctx.spec.method.target_kind
    if schema.digest([table.to_json(), ctx.cfg.method.residual, kind]) != reader.manifest["binding"].get("pairing"):
        raise ValueError(f"{path} is not the pairing table the spool's targets were made with (edited?); "
                         f"rerun `semalign teach` into a new directory")
    return table


# ---------------------------------------------------------------- stream


def stream_jobs(N: int, micro: int, S: int, seed: int) -> list[tuple[int, torch.Tensor]]:
    """Every sample once, as (student rank, sample ids) micro-batches in emission order: each student's samples in
    the order its first stage's first epoch draws them (then the few that epoch leaves out), interleaved over the
    students. Job p goes to teacher p % T."""
    per_student = []
    for s in range(S):
        first = [datamod.micro_batch_ids(N, micro, S, s, seed, m)
                 for m in range(datamod.micro_batches_per_epoch(N, micro, S))]
        used = set(torch.cat(first).tolist())
        rest = torch.tensor([i for i in datamod.owned_samples(N, s, S).tolist() if i not in used], dtype=torch.int64)
        per_student.append(first + (list(rest.split(micro)) if len(rest) else []))
    return [(s, per_student[s][m]) for m in range(max(map(len, per_student))) for s in range(S)
            if m < len(per_student[s])]


def encoded(codec: Codec, packet: SupervisionPacket) -> dict[str, torch.Tensor]:
    """A packet's flat tensors in the run's codec (on the teacher's device: only the encoded bytes move)."""
    return codec.encode(schema.packet_to_flat(packet))


def role_groups(layout: Roles, rank: int):
    """(this rank's role group, its one-rank group); collective: every rank of the world calls it."""
    teacher = dist.new_group(list(layout.teacher_ranks))
    student = dist.new_group(list(layout.student_ranks))
    singles = [dist.new_group([q]) for q in range(layout.world_size)]
    return (teacher if layout.is_teacher(rank) else student), singles[rank]


def role_info(info: DistInfo, ranks: tuple[int, ...]) -> DistInfo:
    """This rank's place among the ranks of its role (data order, checkpoints and logging use it)."""
    return DistInfo(ranks.index(info.rank), len(ranks), info.local_rank, info.backend, info.device)


@contextmanager
def tell_students_on_error(cfg: RunConfig, layout: Roles, device):
    """Around a teacher rank's whole life: an exception is sent to every student (ERROR with its message) before
    it propagates, so the students fail with the teacher's reason instead of a broken link."""
    try:
        yield
    except BaseException as err:
        sender = stream.PacketSender(cfg.transport.window, cfg.transport.timeout_s, device)
        sender.fail(list(layout.student_ranks), f"{type(err).__name__}: {err}")
        raise


def serve_stream(ctx: RunContext, layout: Roles, recipes: dict, M_DsDt, binding: dict, table: PairingTable,
                 first_stage: int, codec: Codec) -> dict:
    """Teacher rank: HELLO (binding + pairing) from the first teacher, then its share of stream_jobs in lockstep
    rounds of T (a spare forward where a round has no job for it), then END on every link."""
    cfg = ctx.cfg
    sender = stream.PacketSender(cfg.transport.window, cfg.transport.timeout_s, ctx.info.device)
    students, T = list(layout.student_ranks), len(layout.teacher_ranks)
    jobs = stream_jobs(len(ctx.blocks), cfg.data.micro_batch_size, len(students), stage_seed(cfg, first_stage))
    digest, t0, spares, samples = schema.digest(binding), time.perf_counter(), 0, 0
    if ctx.info.is_main:
        text = torch.frombuffer(bytearray(table.to_json().encode()), dtype=torch.uint8)
        state = {f"codec.{name}": t for name, t in codec.state().items()}
        for dst in students:
            sender.send(dst, stream.HELLO, {"binding": binding, "codec": codec.describe()}, {"pairing": text, **state})
    for j in bar(range(-(-len(jobs) // T)), "teacher pass (once per sample)", ctx):
        p = j * T + ctx.info.rank
        if p >= len(jobs):
            supervision.emit(ctx, datamod.take(ctx.blocks, jobs[0][1]), recipes, M_DsDt)
            spares += 1
            continue
        s, ids = jobs[p]
        packet = supervision.emit(ctx, datamod.take(ctx.blocks, ids), recipes, M_DsDt)
        sender.send(students[s], stream.DATA, {"job": p, "binding": digest}, encoded(codec, packet))
        samples += len(ids)
    stats = {"packets": sender.packets, "bytes": sender.bytes_sent, "idle_s": sender.idle_s, "samples": samples,
             "wall_s": time.perf_counter() - t0, "spare_forwards": spares}
    for dst in students:
        sender.send(dst, stream.END, {"stats": stats})
    sender.drain()
    return stats


class StreamStore:
    """A student rank's store fed by the teacher ranks: each packet is kept (inner store) as it arrives; the
    micro-batch due next is trained on straight from the wire when it is the next to arrive (the first stage's
    first epoch, on a fresh start), anything else waits until the whole stream is in the store."""

    def __init__(self, ctx: RunContext, layout: Roles, inner, first_stage: int):
        cfg = ctx.cfg
        self.ctx, self.layout, self.inner = ctx, layout, inner
        self.receiver = stream.PacketReceiver(cfg.transport.timeout_s, ctx.info.device)
        S, T = len(layout.student_ranks), len(layout.teacher_ranks)
        jobs = stream_jobs(len(ctx.blocks), cfg.data.micro_batch_size, S, stage_seed(cfg, first_stage))
        self.pending = deque((p, ids) for p, (s, ids) in enumerate(jobs) if s == ctx.info.rank)
        self.T, self.binding, self.teacher_stats, self.codec = T, {}, [], Codec()

    def hello(self) -> PairingTable:
        """The first teacher's HELLO: its binding (checked against this config) and the pairing table."""
        meta, flat = self.receiver.expect(self.layout.teacher_ranks[0], stream.HELLO)
        schema.check_binding(supervision.binding(self.ctx), meta["binding"], "the teacher ranks' stream",
                             "start every rank with the same config and the same files at teacher.path, "
                             "student.path and data.path")
        table = PairingTable.from_json(bytes(flat["pairing"].cpu().numpy()).decode())
        kind = self.ctx.spec.method.target_kind
        if schema.digest([table.to_json(), self.ctx.cfg.method.residual, kind]) != meta["binding"].get("pairing"):
            raise stream.StreamError("the pairing table in the teacher's HELLO does not match its binding")
        state = {name.split(".", 1)[1]: t.cpu() for name, t in flat.items() if name.startswith("codec.")}
        self.codec = Codec.from_state(meta.get("codec", {}), state, "the teacher ranks' stream")
        if self.codec.digest() != meta["binding"].get("codec"):
            raise stream.StreamError("the codec in the teacher's HELLO does not match its binding")
        self.binding = meta["binding"]
        return table

    def _source(self, p: int) -> int:
        return self.layout.teacher_ranks[p % self.T]

    def _next(self) -> dict[str, torch.Tensor]:
        p, ids = self.pending.popleft()
        prefetch = self._source(self.pending[0][0]) if self.pending else None
        meta, flat = self.receiver.expect(self._source(p), stream.DATA, prefetch)
        if meta.get("job") != p or meta.get("binding") != schema.digest(self.binding):
            raise stream.StreamError(f"expected job {p} of the stream from teacher rank {self._source(p)}, got job "
                                     f"{meta.get('job')} (binding {meta.get('binding')}): the ranks run different "
                                     f"configurations or code")
        if not torch.equal(flat["sample_ids"].cpu(), ids):
            raise stream.StreamError(f"job {p} carries samples {flat['sample_ids'].tolist()}, not {ids.tolist()}")
        self.inner.put(flat)
        if not self.pending:
            self._end()
        return flat

    def _end(self) -> None:
        self.teacher_stats = [self.receiver.expect(t, stream.END)[0]["stats"] for t in self.layout.teacher_ranks]
        self.inner.finish()

    def drain(self) -> None:
        while self.pending:
            self._next()

    def flat(self, sample_ids_B: torch.Tensor, layers) -> dict[str, torch.Tensor]:
        if self.pending and torch.equal(self.pending[0][1], sample_ids_B):
            flat = self._next()
            return {name: flat[name] for name in schema.wanted(flat, layers)}
        self.drain()
        return self.inner.flat(sample_ids_B, layers)

    def stats(self) -> dict:
        wall = max(s["wall_s"] for s in self.teacher_stats)
        return {"transport/teacher_idle_fraction": max(s["idle_s"] / max(s["wall_s"], 1e-9)
                                                       for s in self.teacher_stats),
                "transport/teacher_wall_s": wall,
                "transport/spare_forwards": float(sum(s["spare_forwards"] for s in self.teacher_stats)),
                "teacher_samples": float(sum(s["samples"] for s in self.teacher_stats))}
