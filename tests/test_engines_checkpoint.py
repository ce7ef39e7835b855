"""Exact stage resume (1 and 2 torchrun ranks): 6 optimizer steps straight == 3 steps, save, a fresh model
loaded from the saved weights, a fresh stage, load, 3 more steps — bit-identical weights for fp32 with gradient
accumulation, bf16 (fp32 master partitions restored) and LoRA (adapter weights restored from the partitions)."""
import pytest

from semalign_ds.engines.checkpoint import read_progress, unwrapped_state_dict
from semalign_ds.method.lora import add_lora
from workers.engines_common import run_workers, tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "model"
    tiny_llama(seed=3).save_pretrained(path)
    return path


@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_is_exact(model_dir, tmp_path, nproc):
    results = run_workers("resume_worker.py", nproc, tmp_path / "out", ["--model", str(model_dir)], timeout=180)
    files = {"model", "progress.json", *(f"optim_rank{r}.safetensors" for r in range(nproc))}
    for r in results:
        for variant in ("fp32_accum2", "bf16", "lora"):
            v = r[variant]
            assert v["all_equal"] and v["max_diff"] == 0.0, (variant, v["max_diff"])
            assert v["progress"] == {"stage": 2, "step": 3, "optimizer_steps": 3, "dp_world_size": nproc,
                                     "extra": {"tokens_seen": 123}}
            assert v["steps"] == 6 and set(v["files"]) == files
    assert read_progress(tmp_path / "out" / "ckpt_lora")["stage"] == 2


def test_read_progress_refuses_incomplete_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no complete stage checkpoint"):
        read_progress(tmp_path)


def test_unwrapped_state_dict_has_the_original_keys():
    model = tiny_llama(layers=2)
    keys = sorted(model.state_dict())
    add_lora(model.model.layers[1], ["v_proj", "down_proj"], rank=2, alpha=4.0)
    assert any("lora_A" in k for k in model.state_dict())
    assert sorted(unwrapped_state_dict(model)) == keys
