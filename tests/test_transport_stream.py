"""The stream transport between real gloo ranks (plain processes, no launcher): exact packets in order for 1:1,
2:1 and 1:2 teacher:student ratios, and every way one side can fail reaches the other within the timeout."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))

from transport_common import launch, log_of, results  # noqa: E402

SCRIPT = "transport_stream_worker.py"


def run(tmp: Path, world: int, teachers: int, *args: str, timeout: float = 90.0):
    procs = launch(SCRIPT, world, tmp, ["--teachers", str(teachers), *args])
    t0, codes = time.monotonic(), []
    for proc in procs:
        codes.append(proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0))))
    return codes, results(tmp, world)


def expected_order(sent_by_teachers: list[list], student: int) -> list:
    """The (stage, index, student, digest) a student must receive, in the order it must receive them."""
    rows = [tuple(row) for sent in sent_by_teachers for row in sent if row[2] == student]
    return sorted(rows)


@pytest.mark.parametrize("world, teachers", [(2, 1), (3, 2), (3, 1)])
def test_students_receive_exactly_the_packets_sent_in_order(tmp_path, world, teachers):
    codes, res = run(tmp_path, world, teachers, "--count", "5", "--window", "2")
    assert codes == [0] * world, [log_of(tmp_path, r) for r in range(world)]
    sent = [r["sent"] for r in res[:teachers]]
    assert sum(len(s) for s in sent) == 2 * 5 * (world - teachers)  # 2 stages x 5 micro-batches per student
    for s, student in enumerate(res[teachers:]):
        got = [tuple(row[:4]) for row in student["got"]]
        assert got == expected_order(sent, s)  # exact content, stage by stage, micro-batch order
        assert {row[4] for row in student["got"]} == {"torch.bfloat16"}  # targets keep their dtype
        assert {row[5] for row in student["got"]} == {"torch.int64"}  # int32 on the wire, int64 again
        assert [e["packets"] for e in student["ends"]] == [len(x) for x in sent]  # every link ended with END
    if teachers == 2:  # lockstep rounds: teacher t owns packets p = i * S + s with p % T == t
        assert all(row[1] % 2 == t for t, rows in enumerate(sent) for row in rows)


def test_a_teacher_error_reaches_the_students_with_its_message(tmp_path):
    codes, res = run(tmp_path, 3, 2, "--mode", "teacher_error", "--after", "2")
    assert codes == [3, 3, 3]
    assert res[0]["error"] == "teacher blew up on purpose"
    assert "teacher rank 0 failed: RuntimeError: teacher blew up on purpose" in res[2]["error"]


def _fault_time(tmp: Path, rank: int) -> float:
    return float((tmp / f"fault{rank}.txt").read_text().split()[1])


@pytest.mark.parametrize("mode, victim, survivor, needle", [
    ("kill_teacher", 0, 1, "the link to teacher rank 0 broke"),
    ("kill_student", 1, 0, "the link to student rank 1 broke"),
])
def test_killing_one_side_fails_the_other_quickly(tmp_path, mode, victim, survivor, needle):
    timeout = 20.0
    codes, res = run(tmp_path, 2, 1, "--mode", mode, "--timeout", str(timeout))
    assert codes[victim] == -9 and codes[survivor] == 3, log_of(tmp_path, survivor)
    assert needle in res[survivor]["error"]
    assert res[survivor]["error_time"] - _fault_time(tmp_path, victim) < timeout


@pytest.mark.parametrize("mode, victim, survivor, needle", [
    ("stall_teacher", 0, 1, "no progress with teacher rank 0 for 4 s (transport.timeout_s)"),
    ("stall_student", 1, 0, "no progress with student rank 1 for 4 s (transport.timeout_s)"),
])
def test_a_stuck_side_fails_the_other_within_the_timeout(tmp_path, mode, victim, survivor, needle):
    timeout = 4.0
    procs = launch(SCRIPT, 2, tmp_path, ["--teachers", "1", "--mode", mode, "--timeout", str(timeout)])
    try:
        code = procs[survivor].wait(timeout=60)
    finally:
        procs[victim].kill()
        procs[victim].wait()
    res = results(tmp_path, 2)[survivor]
    assert code == 3 and needle in res["error"], log_of(tmp_path, survivor)
    waited = res["error_time"] - _fault_time(tmp_path, victim)
    assert timeout - 2.0 < waited < timeout + 10.0  # the deadline, not the 90 s process-group timeout
