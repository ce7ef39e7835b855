"""The DeepSpeed config builders: "auto" filling, user values kept, contradictions and bad templates refused."""
import json

import pytest
import torch

from semalign_ds.engines.ds_config import load_template, student_ds_config, teacher_ds_config
from workers.engines_common import DS_CONFIGS

TEACHER_CPU = DS_CONFIGS / "teacher_zero3_offload_cpu.json"
TEACHER_NVME = DS_CONFIGS / "teacher_zero3_offload_nvme.json"
STUDENT = DS_CONFIGS / "student_zero2.json"


def _has_key(value, pred) -> bool:
    if isinstance(value, dict):
        return any(pred(k, v) or _has_key(v, pred) for k, v in value.items())
    return False


def test_templates_are_valid_json_with_comments():
    for path in (TEACHER_CPU, TEACHER_NVME, STUDENT):
        template = load_template(path)
        assert "_comment" in template


def test_teacher_cpu_fill_on_cpu_device():
    cfg = teacher_ds_config(load_template(TEACHER_CPU), offload="cpu", bf16=True, micro_batch=4, world_size=2,
                            device="cpu", hidden_size=64)
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["offload_param"]["pin_memory"] is False  # no pinned memory without a GPU
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["train_batch_size"] == 8
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert "optimizer" not in cfg and "scheduler" not in cfg
    assert not _has_key(cfg, lambda k, v: str(k).startswith("_") or v == "auto")


def test_teacher_keeps_user_pinning_on_gpu_and_drops_unsized_autos():
    cfg = teacher_ds_config(load_template(TEACHER_CPU), offload="cpu", bf16=False, micro_batch=1, world_size=1,
                            device="cuda")
    zero = cfg["zero_optimization"]
    assert zero["offload_param"]["pin_memory"] is True
    assert "stage3_prefetch_bucket_size" not in zero  # no hidden size: DeepSpeed's default applies
    from_torch_device = teacher_ds_config(load_template(TEACHER_CPU), offload="cpu", bf16=False, micro_batch=1,
                                          world_size=1, device=torch.device("cpu"))
    assert from_torch_device["zero_optimization"]["offload_param"]["pin_memory"] is False
    with pytest.raises(ValueError, match="runtime.device"):
        teacher_ds_config({}, offload="none", bf16=False, micro_batch=1, world_size=1, device="tpu")
    assert zero["stage3_max_live_parameters"] == 1_000_000_000  # user value kept


def test_teacher_nvme_needs_a_path_and_fills_it(tmp_path):
    template = load_template(TEACHER_NVME)
    with pytest.raises(ValueError, match="nvme_path"):
        teacher_ds_config(template, offload="nvme", bf16=True, micro_batch=1, world_size=1, device="cuda")
    cfg = teacher_ds_config(template, offload="nvme", nvme_path=tmp_path, bf16=True, micro_batch=1, world_size=1,
                            device="cuda")
    assert cfg["zero_optimization"]["offload_param"]["nvme_path"] == str(tmp_path)
    assert cfg["aio"]["block_size"] == 1048576
    assert template["zero_optimization"]["offload_param"]["nvme_path"] == "auto"  # template not mutated


def test_teacher_offload_none_and_contradictions():
    cfg = teacher_ds_config({"zero_optimization": {"stage": 3}}, offload="none", bf16=False, micro_batch=2,
                            world_size=1, device="cpu")
    assert "offload_param" not in cfg["zero_optimization"]
    with pytest.raises(ValueError, match="offload_param.device"):
        teacher_ds_config(load_template(TEACHER_CPU), offload="none", bf16=False, micro_batch=1, world_size=1,
                          device="cpu")
    with pytest.raises(ValueError, match="offload_param.device"):
        teacher_ds_config(load_template(TEACHER_CPU), offload="nvme", nvme_path="/x", bf16=False, micro_batch=1,
                          world_size=1, device="cpu")
    with pytest.raises(ValueError, match="zero_optimization.stage"):
        teacher_ds_config({"zero_optimization": {"stage": 2}}, offload="none", bf16=False, micro_batch=1,
                          world_size=1, device="cpu")
    with pytest.raises(ValueError, match="'optimizer'"):
        teacher_ds_config({"optimizer": {"type": "AdamW"}}, offload="none", bf16=False, micro_batch=1,
                          world_size=1, device="cpu")
    with pytest.raises(ValueError, match="must be 'cpu', 'nvme' or 'none'"):
        teacher_ds_config({}, offload="disk", bf16=False, micro_batch=1, world_size=1, device="cpu")


def test_student_fill():
    cfg = student_ds_config(load_template(STUDENT), bf16=False, micro_batch=3, grad_accum=4, world_size=2,
                            grad_clip=0.5, hidden_size=16)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 256
    assert cfg["train_batch_size"] == 24 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is False
    assert "optimizer" not in cfg and not _has_key(cfg, lambda k, v: str(k).startswith("_") or v == "auto")
    no_clip = student_ds_config(load_template(STUDENT), bf16=True, micro_batch=1, grad_accum=1, world_size=1,
                                grad_clip=0.0)
    assert no_clip["gradient_clipping"] == 0.0 and "reduce_bucket_size" not in no_clip["zero_optimization"]


def test_student_user_values_kept_or_contradiction_named():
    template = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}}
    cfg = student_ds_config(template, bf16=False, micro_batch=2, grad_accum=1, world_size=1, grad_clip=1.0)
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu is 2 .* needs 4"):
        student_ds_config(template, bf16=False, micro_batch=4, grad_accum=1, world_size=1, grad_clip=1.0)
    with pytest.raises(ValueError, match="'scheduler'"):
        student_ds_config({"scheduler": {}}, bf16=False, micro_batch=1, grad_accum=1, world_size=1, grad_clip=1.0)
    with pytest.raises(ValueError, match="fp16.enabled"):
        student_ds_config({"fp16": {"enabled": True}}, bf16=False, micro_batch=1, grad_accum=1, world_size=1,
                          grad_clip=1.0)
    with pytest.raises(ValueError, match="zero_optimization.overlap_comm"):
        student_ds_config({"zero_optimization": {"overlap_comm": "auto"}}, bf16=False, micro_batch=1,
                          grad_accum=1, world_size=1, grad_clip=1.0)
    with pytest.raises(ValueError, match="micro_batch must be a positive integer"):
        student_ds_config({}, bf16=False, micro_batch=0, grad_accum=1, world_size=1, grad_clip=1.0)


def test_load_template_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.json.*does not exist"):
        load_template(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        load_template(bad)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="list.json.*JSON object"):
        load_template(listed)
