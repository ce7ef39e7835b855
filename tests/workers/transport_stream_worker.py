"""Stream worker: T teacher ranks send synthetic packets of two stages (different layouts) to S student ranks.

Both sides record (stage, micro-batch, student, digest) in order. Modes: ok | kill_teacher (teacher rank 0
SIGKILLs itself after --after packets) | kill_student (student rank 0 likewise) | stall_teacher / stall_student
(rank 0 of that role stops taking part but stays alive) | teacher_error (teacher 0 raises; it must tell the
students). A rank that fails writes its error and the time of it, then exits 3; a rank about to kill itself first
writes the time of the kill.
"""
from engines_common import worker_finish, worker_start

out_dir, rest = worker_start(hang_timeout=120)

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from datetime import timedelta  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from semalign_ds.spec import Roles  # noqa: E402
from semalign_ds.transport import schema, stream  # noqa: E402
from transport_common import kill_self, packet_digest, stream_packet  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--teachers", type=int, default=1)
parser.add_argument("--mode", default="ok")
parser.add_argument("--timeout", type=float, default=20.0)
parser.add_argument("--window", type=int, default=2)
parser.add_argument("--count", type=int, default=5, help="micro-batches per student per stage")
parser.add_argument("--after", type=int, default=3, help="packets before the fault")
parser.add_argument("--student-sleep", type=float, default=0.0, dest="student_sleep")
args = parser.parse_args(rest)

dist.init_process_group("gloo", timeout=timedelta(seconds=90))
RANK = dist.get_rank()
LAYOUT = Roles.build("disaggregated", dist.get_world_size(), args.teachers)
T, S = len(LAYOUT.teacher_ranks), len(LAYOUT.student_ranks)
STAGES = [1, 2]
DIGEST = schema.digest({"schema": "1", "test": "stream"})
CPU = torch.device("cpu")


def mark_fault(kind: str) -> None:
    (out_dir / f"fault{RANK}.txt").write_text(f"{kind} {time.time()}")


def teacher(t: int) -> dict:
    sender = stream.PacketSender(args.window, args.timeout, CPU)
    sent, t0 = [], time.perf_counter()
    try:
        for k in STAGES:
            for p in range(t, args.count * S, T):  # job p: student p % S's micro-batch p // S, from teacher p % T
                if t == 0 and len(sent) == args.after:
                    fault(args.mode)
                i, s = divmod(p, S)
                packet = stream_packet(k, i, s)
                sender.send(LAYOUT.student_ranks[s], stream.DATA, {"stage": k, "index": i, "binding": DIGEST},
                            schema.packet_to_flat(packet))
                sent.append([k, i, s, packet_digest(packet)])
        for dst in LAYOUT.student_ranks:
            sender.send(dst, stream.END, {"stats": {"packets": sender.packets}})
        sender.drain()
    except Exception as err:
        sender.fail(list(LAYOUT.student_ranks), f"{type(err).__name__}: {err}")
        return {"role": "teacher", "sent": sent, "error": str(err), "error_time": time.time()}
    return {"role": "teacher", "sent": sent, "idle_s": sender.idle_s, "wall_s": time.perf_counter() - t0,
            "bytes": sender.bytes_sent}


def fault(mode: str) -> None:
    if mode == "kill_teacher":
        mark_fault(mode)
        kill_self()
    if mode == "stall_teacher":
        mark_fault(mode)
        time.sleep(10 * args.timeout)
    if mode == "teacher_error":
        raise RuntimeError("teacher blew up on purpose")


def received(receiver, k: int, route):
    """Stage k's packets for this student in order, the next one's receives posted early (prefetch)."""
    for i in range(args.count):
        nxt = route(i + 1) if i + 1 < args.count else None
        meta, flat = receiver.expect(route(i), stream.DATA, nxt)
        assert meta["stage"] == k and meta["index"] == i and meta["binding"] == DIGEST, meta
        yield schema.packet_from_flat(flat)


def student(s: int) -> dict:
    receiver = stream.PacketReceiver(args.timeout, CPU)
    got = []
    try:
        route = lambda i: LAYOUT.teacher_ranks[(i * S + s) % T]  # noqa: E731
        for k in STAGES:
            for i, packet in enumerate(received(receiver, k, route)):
                if args.mode in ("kill_student", "stall_student") and s == 0 and len(got) == args.after:
                    mark_fault(args.mode)
                    kill_self() if args.mode == "kill_student" else time.sleep(10 * args.timeout)
                got.append([k, i, s, packet_digest(packet), str(packet.targets[k].dtype),
                            str(packet.top_idx_BTK.dtype)])
                time.sleep(args.student_sleep)
        ends = [receiver.expect(t, stream.END)[0]["stats"] for t in LAYOUT.teacher_ranks]
    except stream.StreamError as err:
        return {"role": "student", "got": got, "error": str(err), "error_time": time.time()}
    return {"role": "student", "got": got, "ends": ends, "bytes": receiver.bytes_received}


result = teacher(RANK) if LAYOUT.is_teacher(RANK) else student(LAYOUT.student_ranks.index(RANK))
worker_finish(out_dir, result)
if "error" in result:
    os._exit(3)  # pending receives/sends of a broken link: leave without tearing the process group down
