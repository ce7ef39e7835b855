"""The real-to-real quality bench's plan (bench/quality/r2r_plan.py) without models: every row builds a valid run
config that pins every preset key, the rows of a pair share one budget, and the spools are shared exactly by the
rows whose packets are the same."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench" / "quality"))

import r2r_plan  # noqa: E402
import real2real  # noqa: E402
from semalign_ds import config as cfgmod  # noqa: E402
from worker import run_config  # noqa: E402

PATHS = {"gemma_smollm2": {"teacher": "/t", "student": "/s", "transfer": "/d.jsonl", "replay": "/r.jsonl"}}


@pytest.mark.parametrize("row", list(r2r_plan.ROWS))
def test_every_row_builds_and_pins_every_preset_key(row, tmp_path):
    s = real2real.spec(tmp_path, PATHS, "gemma_smollm2", row, 1e-3, 0)
    cfg = run_config(s, PATHS["gemma_smollm2"], list(r2r_plan.FULL.overrides()), None, "x")
    assert cfg.method.preset is None
    pinned = {o.split("=", 1)[0] for o in r2r_plan.ROWS[row].overrides}
    assert set(cfgmod.PRESET_KEYS) <= pinned
    assert cfg.schedule.stages == [1, 10, 20, 30] and cfg.data.max_sequences == 1000
    teacherless = row.startswith("sft")  # no teacher output: colocated, no teacher loaded, no spool
    assert cfg.schedule.epochs_per_stage == 3.0 and cfg.runtime.topology == ("colocated" if teacherless else "spool")
    assert (cfg.data.replay_fraction, cfg.data.replay_path) == ((0.25, "/r.jsonl") if r2r_plan.ROWS[row].replay
                                                                else (0.0, None))


def test_rows_share_a_spool_only_when_their_packets_are_the_same(tmp_path):
    spool = {r: real2real.spool_dir(tmp_path, "gemma_demo", r) for r in r2r_plan.ROWS}
    assert spool["best"] == spool["paper_v2"] == spool["abl_lr_third"]  # same teacher outputs, other training
    assert len({spool["best"], spool["sft"], spool["kd"], spool["best_replay"], spool["abl_uld"],
                spool["abl_topk1024"]}) == 6
    assert spool["sft"] != spool["sft_replay"]  # other data, other packets
