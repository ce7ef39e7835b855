"""The CUDA path end to end (marked gpu: skipped without a GPU): a bf16 teacher under ZeRO-3 on the NCCL backend,
one rank, `semalign teach` then `semalign train --from-spool`, and a colocated run; one teacher pass per sample."""
from __future__ import annotations

import json

import pytest

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pipeline import semalign, write_config  # noqa: E402

pytestmark = pytest.mark.gpu


def _mlflow_metrics(run_dir):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("semalign").experiment_id])
    return run


def test_teach_and_train_on_cuda_with_a_bf16_teacher(tmp_path, tiny_pair):
    cfg = write_config(tmp_path, tiny_pair, teacher={"dtype": "bfloat16"}, runtime={"device": "cuda"},
                       method={"target_dtype": "bfloat16"}, transport={"shard_sequences": 16})
    semalign("teach", "--config", cfg, "--out", tmp_path / "spool")
    manifest = json.loads((tmp_path / "spool" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["teacher_passes_per_sample"] == 1.0
    semalign("train", "--config", cfg, "--from-spool", tmp_path / "spool")
    run = _mlflow_metrics(tmp_path / "run")
    assert run.info.status == "FINISHED" and run.data.metrics["teacher_passes_per_sample"] == 1.0
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


def test_colocated_run_on_cuda(tmp_path, tiny_pair):
    cfg = write_config(tmp_path, tiny_pair, teacher={"dtype": "bfloat16"}, runtime={"device": "cuda"},
                       method={"target_dtype": "bfloat16"})
    semalign("run", "--config", cfg)
    run = _mlflow_metrics(tmp_path / "run")
    assert run.data.tags["world_size"] == "1" and run.data.metrics["teacher_passes_per_sample"] == 1.0
    assert run.data.metrics["layer_loss"] > 0
