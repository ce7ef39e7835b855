"""The three topologies: what feeds the student loop its packets, and the teacher-side loops that make them.

colocated      ColocatedFeed: the teacher engine on every rank emits each micro-batch's packet in memory.
disaggregated  teacher ranks run `serve_stream` (ZeRO-3 over the teacher group, lockstep rounds, PacketSender);
               student ranks read a StreamFeed (PacketReceiver; ZeRO-2 over the student group).
spool          `write_spool` (`semalign teach`): one teacher pass per sample emits every stage's targets into
               shards; SpoolFeed (`semalign train --from-spool`) reads rows by sample id.
Every feed has `source(k, layers, start, steps)`: the PacketSource of this rank's micro-batches start*GA ..
steps*GA - 1 of stage k, in the colocated data order (so a stage trained from any feed sees the same batches),
and `stats()` (bytes per token of what travelled, for MLflow). The student loop is the same for all three.
Legend: GA gradient accumulation steps, S student ranks, T teacher ranks, N transfer samples.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from semalign_ds import resume, signals, supervision
from semalign_ds.distributed import DistInfo, RankLayout, barrier
from semalign_ds.method.pairing import PairingTable
from semalign_ds.progress import bar
from semalign_ds.transport import schema, spool, stream
from semalign_ds.transport.packet import InProcessSource, SupervisionPacket


class _Feed:
    """Counts what the student received: bytes of the packets' wire/disk form and real tokens."""

    kind = "memory"

    def __init__(self, r):
        self.r, self.bytes, self.tokens = r, 0, 0

    def count(self, packet: SupervisionPacket, nbytes: int | None = None) -> SupervisionPacket:
        self.bytes += schema.flat_nbytes(schema.packet_to_flat(packet)) if nbytes is None else nbytes
        self.tokens += packet.num_tokens
        return packet

    def stats(self) -> dict:
        return {f"transport/{self.kind}_bytes_per_token": self.bytes / max(self.tokens, 1),
                f"transport/{self.kind}_bytes": float(self.bytes)}

    def capped_steps(self, steps: int) -> int:
        return steps


class ColocatedFeed(_Feed):
    def __init__(self, r, recipes: dict, M_DsDt):
        super().__init__(r)
        self.recipes, self.M = recipes, M_DsDt

    def source(self, k: int, layers: list[int], start: int, steps: int) -> InProcessSource:
        r, ga = self.r, self.r.cfg.schedule.grad_accum
        recipes = {l: self.recipes[l] for l in layers}

        def produce():
            for index in range(start * ga, steps * ga):
                batch = supervision.rank_batch(r, r.cfg.seed + k, index)
                yield self.count(supervision.emit(r, batch, recipes, self.M))
        return InProcessSource(produce())


# ---------------------------------------------------------------- spool


class SpoolFeed(_Feed):
    """Rows of a spool in the colocated order; the reader position goes into the student's checkpoint."""

    kind = "spool_read"

    def __init__(self, r, reader: spool.SpoolReader):
        super().__init__(r)
        self.reader = reader
        self.spool_id = reader.manifest["binding_digest"]
        r.progress["teacher_passes"] = reader.manifest.get("teacher_passes_per_sample", 1.0)
        self.table = self._pairing()

    def _pairing(self) -> PairingTable:
        """The spool's pairing table, checked against the hash its manifest binds the targets to."""
        path = self.reader.directory / spool.PAIRING
        if not path.is_file():
            raise ValueError(f"the spool in {str(self.reader.directory)!r} lacks {spool.PAIRING}; rerun "
                             f"`semalign teach`")
        table = PairingTable.from_json(path.read_text())
        kind = supervision.target_kind(self.r.cfg)
        if schema.digest([table.to_json(), self.r.cfg.method.residual, kind]) != self.reader.manifest["binding"].get(
                "pairing"):
            raise ValueError(f"{path} is not the pairing table the spool's targets were made with (edited?); "
                             f"rerun `semalign teach` into a new directory")
        return table

    def capped_steps(self, steps: int) -> int:
        """A stage's optimizer steps: at most transport.epochs passes over the spool."""
        cfg, world = self.r.cfg, self.r.info.world_size
        per_epoch = self.reader.num_samples // (cfg.data.micro_batch_size * world)
        cap = cfg.transport.epochs * per_epoch // cfg.schedule.grad_accum
        if cap < 1:
            raise ValueError(f"the spool holds {self.reader.num_samples} samples: not one optimizer step of "
                             f"{cfg.data.micro_batch_size} x {world} ranks x {cfg.schedule.grad_accum} accumulation "
                             f"per transport.epochs={cfg.transport.epochs}; raise transport.epochs or use fewer ranks")
        return min(steps, cap)

    def source(self, k: int, layers: list[int], start: int, steps: int) -> InProcessSource:
        r, ga = self.r, self.r.cfg.schedule.grad_accum
        resume.check_spool_position(r, k, start * ga, self.spool_id)

        def produce():
            for index in range(start * ga, steps * ga):
                batch = supervision.rank_batch(r, r.cfg.seed + k, index)
                before = self.reader.bytes_read
                packet = self.reader.packet(batch.sample_ids_B, layers)
                if not torch.equal(packet.ids_BT, batch.ids_BT):
                    raise ValueError(f"the spool's tokens for samples {batch.sample_ids_B.tolist()} differ from this "
                                     f"run's data; the spool was written from other data")
                resume.record_spool_position(r, k, index + 1, self.spool_id)
                yield self.count(packet, self.reader.bytes_read - before)
        return InProcessSource(produce())


def write_spool(r, recipes: dict, M_DsDt, binding: dict, stages: list[int]) -> dict:
    """Every teacher rank writes whole shards (pending shards dealt round-robin; ZeRO-3 lockstep kept by spare
    forwards); rank 0 writes the manifest once all are committed. Resumes an interrupted spool."""
    cfg = r.cfg
    plan = spool.open_plan(Path(cfg.transport.spool_dir), binding, len(r.blocks), cfg.transport.shard_sequences,
                           stages)
    barrier(r.group)
    pending = plan.pending()
    barrier(r.group)  # every rank saw the same committed shards before anyone writes
    world, rank = r.info.world_size, r.info.rank
    per_shard = -(-plan.shard_rows // cfg.data.micro_batch_size)
    t0, spares = time.perf_counter(), 0
    rounds = bar(range(0, len(pending), world), "spool shards", r, unit="round")
    for first in signals.graceful_steps(rounds, None, r.group, r.info.device):  # committed shards are the resume
        j = pending[first + rank] if first + rank < len(pending) else None
        spares += _write_shard(r, plan, j, per_shard, recipes, M_DsDt, spare=world > 1)
    barrier(r.group)
    extra = {"teacher_passes_per_sample": 1.0, "seq_len": r.blocks.seq_len, "top_k": cfg.method.top_k,
             "target_dtype": cfg.method.target_dtype,
             "reference_bytes_per_token": schema.bytes_per_token_model(len(stages), _student_hidden(r),
                                                                        cfg.method.top_k)}
    manifest = spool.write_manifest(plan, extra) if r.info.is_main else {}
    barrier(r.group)
    r.progress.update(spool_write_s=time.perf_counter() - t0, spare_forwards=spares, shards_written=len(pending))
    return manifest


def _write_shard(r, plan: spool.SpoolPlan, j: int | None, per_shard: int, recipes: dict, M, spare: bool) -> int:
    micro, spares = r.cfg.data.micro_batch_size, 0
    first, n = plan.rows_of(j) if j is not None else (0, 0)
    shard = None
    try:
        for m in range(per_shard):
            a = m * micro
            if a >= n:
                if spare:  # keep ZeRO-3's lockstep with the ranks still writing
                    supervision.emit(r, supervision.rows_batch(r, 0, 1), recipes, M)
                    spares += 1
                continue
            flat = schema.packet_to_flat(supervision.emit(r, supervision.rows_batch(r, first + a, min(micro, n - a)),
                                                          recipes, M))
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
    return spares


def _student_hidden(r) -> int:
    from semalign_ds.models.adapters import get_adapter

    return get_adapter(r.student).hidden_size


# ---------------------------------------------------------------- stream


def role_groups(layout: RankLayout, rank: int):
    """(this rank's role group, its one-rank group); collective: every rank of the world calls it."""
    teacher = dist.new_group(list(layout.teacher_ranks))
    student = dist.new_group(list(layout.student_ranks))
    singles = [dist.new_group([q]) for q in range(layout.world_size)]
    return (teacher if layout.is_teacher(rank) else student), singles[rank]


def role_info(info: DistInfo, ranks: tuple[int, ...]) -> DistInfo:
    """This rank's place among the ranks of its role (rank_batch, checkpoints and logging use it)."""
    return DistInfo(ranks.index(info.rank), len(ranks), info.local_rank, info.backend, info.device)


@contextmanager
def tell_students_on_error(cfg, layout: RankLayout, device):
    """Around a teacher rank's whole life: an exception is sent to every student (ERROR with its message) before
    it propagates, so the students fail with the teacher's reason instead of a broken link."""
    try:
        yield
    except BaseException as err:
        sender = stream.PacketSender(cfg.transport.window, cfg.transport.timeout_s, device)
        sender.fail(list(layout.student_ranks), f"{type(err).__name__}: {err}")
        raise


def serve_stream(r, layout: RankLayout, recipes: dict, M_DsDt, binding: dict, table: PairingTable,
                 schedule: list[tuple[int, list[int], int, int]]) -> dict:
    """Teacher rank: HELLO (binding + pairing) from the first teacher, then each stage's packets in lockstep
    rounds, then END on every link (errors reach the students through tell_students_on_error)."""
    cfg = r.cfg
    sender = stream.PacketSender(cfg.transport.window, cfg.transport.timeout_s, r.info.device)
    students = list(layout.student_ranks)
    digest, t0, spares = schema.digest(binding), time.perf_counter(), 0
    if r.info.is_main:
        text = torch.frombuffer(bytearray(table.to_json().encode()), dtype=torch.uint8)
        for dst in students:
            sender.send(dst, stream.HELLO, {"binding": binding}, {"pairing": text})
    for k, layers, start, steps in schedule:
        spares += _stream_stage(r, sender, layout, k, {l: recipes[l] for l in layers}, M_DsDt, start, steps, digest)
    stats = {"packets": sender.packets, "bytes": sender.bytes_sent, "idle_s": sender.idle_s,
             "wall_s": time.perf_counter() - t0, "spare_forwards": spares}
    for dst in students:
        sender.send(dst, stream.END, {"stats": stats})
    sender.drain()
    return stats


def _stream_stage(r, sender, layout: RankLayout, k: int, recipes: dict, M, start: int, steps: int,
                  digest: str) -> int:
    ga = r.cfg.schedule.grad_accum
    S, T = len(layout.student_ranks), len(layout.teacher_ranks)
    first, count = start * ga, (steps - start) * ga
    spares = 0
    for j in range(stream.rounds(T, S, count)):
        job = stream.round_job(j, r.info.rank, T, S, first, count)
        if job is None:  # keep ZeRO-3's lockstep: every teacher rank takes part in every forward
            supervision.emit(r, supervision.rank_batch(r, r.cfg.seed + k, first, 0, S), recipes, M)
            spares += 1
            continue
        i, s = job
        packet = supervision.emit(r, supervision.rank_batch(r, r.cfg.seed + k, i, s, S), recipes, M)
        sender.send(layout.student_ranks[s], stream.DATA, {"stage": k, "index": i, "binding": digest},
                    schema.packet_to_flat(packet))
    return spares


class StreamFeed(_Feed):
    """Student rank: packets from the teacher ranks, each micro-batch from the teacher the routing names."""

    kind = "wire"

    def __init__(self, r, layout: RankLayout):
        super().__init__(r)
        cfg = r.cfg
        self.layout = layout
        self.receiver = stream.PacketReceiver(cfg.transport.timeout_s, r.info.device)
        self.binding: dict = {}
        self.teacher_stats: list[dict] = []

    def hello(self) -> PairingTable:
        """The first teacher's HELLO: its binding (checked against this config) and the pairing table."""
        meta, flat = self.receiver.expect(self.layout.teacher_ranks[0], stream.HELLO)
        schema.check_binding(supervision.binding(self.r), meta["binding"], "the teacher ranks' stream",
                             "start every rank with the same config and the same files at teacher.path, "
                             "student.path and data.path")
        table = PairingTable.from_json(bytes(flat["pairing"].cpu().numpy()).decode())
        kind = supervision.target_kind(self.r.cfg)
        if schema.digest([table.to_json(), self.r.cfg.method.residual, kind]) != meta["binding"].get("pairing"):
            raise stream.StreamError("the pairing table in the teacher's HELLO does not match its binding")
        self.binding = meta["binding"]
        return table

    def source(self, k: int, layers: list[int], start: int, steps: int):
        r, ga = self.r, self.r.cfg.schedule.grad_accum
        S, T, s = len(self.layout.student_ranks), len(self.layout.teacher_ranks), r.info.rank
        first = start * ga
        route = lambda i: self.layout.teacher_ranks[stream.source_of(i, s, S, T, first)]  # noqa: E731
        src = stream.StreamSource(self.receiver, k, first, (steps - start) * ga, route, schema.digest(self.binding))
        return InProcessSource(self._counted(src))

    def _counted(self, src):
        n = max(len(self.r.blocks), 1)
        for packet in src:
            self.r.progress["teacher_passes"] = self.r.progress.get("teacher_passes", 0) + packet.ids_BT.shape[0] / n
            wire = schema.flat_nbytes(schema.packet_to_flat(packet)) + stream.HEADER_BYTES
            yield self.count(packet, wire)

    def finish(self) -> dict:
        """Every teacher's END (its counters); the stream closed cleanly."""
        self.teacher_stats = [self.receiver.expect(t, stream.END)[0]["stats"] for t in self.layout.teacher_ranks]
        wall = max(s["wall_s"] for s in self.teacher_stats)
        return {"transport/teacher_idle_fraction": max(s["idle_s"] / max(s["wall_s"], 1e-9)
                                                       for s in self.teacher_stats),
                "transport/teacher_wall_s": wall,
                "transport/spare_forwards": float(sum(s["spare_forwards"] for s in self.teacher_stats))}
