"""ZeRO-3 offload teacher (1 and 2 torchrun ranks, gloo): its packets, weights and attribution equal a plain
forward of the same checkpoint (tests/workers/teacher_worker.py computes both and reports the differences)."""
import pytest

from workers.engines_common import run_workers, tiny_llama

TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "model"
    tiny_llama(seed=1).save_pretrained(path)
    return path


@pytest.mark.parametrize("nproc", [1, 2])
def test_zero3_teacher_matches_plain_forward(model_dir, tmp_path, nproc):
    results = run_workers("teacher_worker.py", nproc, tmp_path / "out", ["--model", str(model_dir)])
    for rank, r in enumerate(results):
        assert r["teacher_partitioned"] and r["teacher_big_params_empty"]  # ZeRO-3 partitioned at load
        assert not r["ref_partitioned"]  # HfDeepSpeedConfig released: later loads are plain
        assert not r["teacher_requires_grad"] and not r["teacher_requires_grad_after"]
        assert r["target_keys"] == [1, 2, 3] and r["target_shapes"] == [[2, 12, 24]] * 3
        assert r["target_diff"] < TOL
        assert r["topk_idx_equal"] and r["topk_value_diff"] < TOL and r["tail_diff"] < TOL
        assert r["full_logits_diff"] < TOL and r["no_topk_with_full"]
        assert r["mapped_idx_equal"] and r["mapped_value_diff"] < TOL and r["mapped_tail_diff"] < TOL
        assert r["cross_target_diff"] < TOL and r["cross_value_diff"] < TOL and r["cross_masks"]
        assert r["head_shape"] == [128, 32] and r["head_diff"] == 0.0 and r["embed_diff"] == 0.0
        assert r["gain_offset"] == 0.0 and r["gain_offset_spread"] == 0.0  # Llama's norm multiplies by its weight
        assert r["sample_ids"] == [rank, rank + 10]
        assert r["wrap_state_diff"] < TOL and r["wrap_logits_none"]
        # attribution: ZeRO-3 backward through offloaded frozen params equals plain autograd, all-reduced
        assert r["attr_abs_diff"] < 1e-8 and r["attr_signed_diff"] < 1e-8
        assert all(v > 0 for v in r["attr_abs"])
    if nproc == 2:
        assert results[0]["attr_abs"] == results[1]["attr_abs"]
