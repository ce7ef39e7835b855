"""`semalign eval` through lm-eval's Python API on tiny models built here, with local tasks (YAML + JSONL):
scores in range and ordered, the teacher's cache, the run directory's files and MLflow run, the shipped task."""
import json
import re
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from semalign_ds import cli, tracking
from semalign_ds.evaluation import lm_eval_bridge, stdlib_task
from semalign_ds import config as cfgmod
from semalign_ds.models.loading import load_causal_lm, load_tokenizer

TASK = "first_or_last"


def _question(i: int) -> tuple[str, str]:
    """Item i asks for the first or the last Greek letter (in turn): the answer depends on the question."""
    return (f"item {i}: which letter comes first?", "alpha") if i % 2 else (f"item {i}: which letter comes last?",
                                                                             "omega")


def _task_dir(root: Path, n: int = 16) -> Path:
    """A 2-way multiple-choice task (choices alpha / omega, the answer at either position)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{TASK}.jsonl", "w") as f:
        for i in range(n):
            question, answer = _question(i)
            choices = ["alpha", "omega"] if i % 4 < 2 else ["omega", "alpha"]
            f.write(json.dumps({"question": question, "choices": choices, "label": choices.index(answer)}) + "\n")
    (root / f"{TASK}.yaml").write_text(yaml.safe_dump({
        "task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(root / f"{TASK}.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    return root


def _train_to_say_omega(src: Path, dst: Path) -> Path:
    """A copy of the checkpoint trained for a few steps on the task's right answers: better on it by design."""
    model, tok = load_causal_lm(src, torch.float32, "cpu"), load_tokenizer(src)
    texts = ["Question: {}\nAnswer: {}".format(*_question(i)) for i in range(16)]
    batch = tok(texts, return_tensors="pt", padding=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(60):
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def world(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    return {"task": _task_dir(root / "tasks"), "trained": _train_to_say_omega(tiny_pair["student"], root / "trained"),
            **tiny_pair}


def _settings(**kw):
    return cfgmod.LmEvalConfig(**{"tasks": [TASK], "batch_size": 8, **kw})


def _spec(path, label="model"):
    return lm_eval_bridge.ModelSpec(label, Path(path), "float32", False, "test")


def test_a_model_better_on_the_task_scores_higher(world):
    settings = _settings()
    manager = lm_eval_bridge.task_manager([TASK], [str(world["task"])])
    before = lm_eval_bridge.score(_spec(world["student"]), [TASK], settings, manager, "cpu")[TASK]
    after = lm_eval_bridge.score(_spec(world["trained"]), [TASK], settings, manager, "cpu")[TASK]
    assert 0.0 <= before["acc"] <= 0.75 and before["n"] == 16
    assert after["acc"] >= 0.9
    assert 0.0 <= after["acc_stderr"] < 0.2


def test_the_teacher_is_scored_once_per_weights_task_and_settings(world, tmp_path, monkeypatch):
    manager = lm_eval_bridge.task_manager([TASK], [str(world["task"])])
    spec, cache = _spec(world["teacher"], "teacher"), tmp_path / "cache"
    first = lm_eval_bridge.cached_score(spec, [TASK], _settings(), manager, "cpu", cache)
    calls = []
    monkeypatch.setattr(lm_eval_bridge, "score", lambda *a: calls.append(a[2].limit) or {TASK: {"acc": 0.0}})
    assert lm_eval_bridge.cached_score(spec, [TASK], _settings(), manager, "cpu", cache) == first
    assert calls == []  # a cache hit: no evaluation
    lm_eval_bridge.cached_score(spec, [TASK], _settings(limit=4), manager, "cpu", cache)
    assert calls == [4]  # other settings: evaluated again


def _run_dir(world, root: Path, store) -> Path:
    run = store(root / "run")
    shutil.copytree(world["trained"], run / "student")
    raw = {"name": "t", "teacher": {"path": str(world["teacher"]), "dtype": "float32"},
           "student": {"path": str(world["student"]), "dtype": "float32"}, "runtime": {"device": "cpu"},
           "eval": {"lm_eval": {"tasks": [TASK], "include_path": [str(world["task"])]}}}
    (run / "config.yaml").write_text(cfgmod.to_yaml(cfgmod.config_from_dict(raw)))
    tracker = tracking.make_tracker(True, True, None, "semalign", "t", run)
    tracker.finish()
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "run.json").write_text(json.dumps({"mlflow_run_id": tracker.run_id}))
    (run / "eval.md").write_text("| model | target ppl |\n|---|---:|\n| student before | 304 |\n")
    (run / "eval.json").write_text(json.dumps({"perplexity": {"target": {}}}))
    return run


def test_eval_of_a_moved_run_directory_merges_its_files_and_logs_to_its_run(world, tmp_path, store, capsys,
                                                                           caplog):
    run = _run_dir(world, tmp_path / "first", store)
    moved = tmp_path / "moved"
    shutil.move(str(run), str(moved))
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        assert cli.main(["eval", str(moved)]) == 0
    out = capsys.readouterr().out
    for label in ("student before", "student after", "teacher"):  # each model named as it is scored
        assert re.search(rf"^lm-eval: scoring {label} \(\S+\) on {TASK}$", out, re.M), out
    assert not [r for r in caplog.records if "not of type `str`" in r.getMessage()]  # lm-eval's per-model warning
    md = (moved / "eval.md").read_text()
    assert md.startswith("| model | target ppl |") and md.count(lm_eval_bridge.SECTION_START) == 1
    data = json.loads((moved / "eval.json").read_text())
    assert "perplexity" in data and set(data["lm_eval"]) == {"student_before", "student_after", "teacher"}
    assert data["lm_eval"]["student_after"][TASK]["acc"] > data["lm_eval"]["student_before"][TASK]["acc"]
    run_id = tracking.run_id_from_dir(moved)
    client = mlflow.MlflowClient(tracking.local_store_uri(moved))
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics[f"eval/lm_eval/{TASK}/student_after_acc"] >= 0.9
    assert {"eval.md", "eval.json"} <= {a.path for a in client.list_artifacts(run_id)}  # relinked
    capsys.readouterr()
    assert cli.main(["eval", str(moved)]) == 0  # again: the section is replaced, the teacher comes from the cache
    assert "teacher: cached scores" in capsys.readouterr().out
    assert (moved / "eval.md").read_text().count(lm_eval_bridge.SECTION_START) == 1


def test_a_checkpoint_is_scored_only_into_a_directory_the_user_names(world, tmp_path, capsys):
    base = ["--tasks", TASK, f"eval.lm_eval.include_path=[{world['task']}]", "runtime.device=cpu",
            "student.dtype=float32"]
    assert cli.main(["eval", str(world["student"]), *base]) == 2
    assert "--out DIR" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert cli.main(["eval", str(world["student"]), "--out", str(taken), *base]) == 2
    assert "nothing was written" in capsys.readouterr().err and sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    out = tmp_path / "scores"
    assert cli.main(["eval", str(world["student"]), "--out", str(out), *base]) == 0
    assert json.loads((out / "semalign.json").read_text())["kind"] == "eval"
    assert json.loads((out / "eval.json").read_text())["lm_eval"]["model"][TASK]["about"]["lm_eval"]
    assert 0.0 <= json.loads((out / "eval.json").read_text())["lm_eval"]["model"][TASK]["acc"] <= 1.0
    assert cli.main(["eval", str(world["trained"]), "--out", str(out), *base]) == 2  # another checkpoint's scores
    assert cli.main(["eval", str(tmp_path), "--tasks", TASK]) == 2  # neither a run nor a checkpoint


def test_unknown_tasks_and_no_tasks_are_clear_errors(world):
    with pytest.raises(ValueError, match="no lm-eval tasks"):
        lm_eval_bridge.task_manager([], [])
    with pytest.raises(ValueError, match="include_path"):
        lm_eval_bridge.task_manager([TASK], [str(world["task"] / "missing")])


def test_a_task_whose_data_is_on_the_hub_is_a_clear_error_here(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # as on this machine: no hub
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump({
        "task": "hub_task", "dataset_path": "someone/some_dataset", "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "{{c}}", "doc_to_target": 0}))
    with pytest.raises(ValueError, match="Hugging Face hub"):
        lm_eval_bridge.task_manager(["hub_task"], [str(tmp_path)])


def test_the_shipped_stdlib_task_is_deterministic_and_masks_the_answer(tmp_path, monkeypatch):
    items = stdlib_task.build_items()
    assert 100 <= len(items) <= stdlib_task.MAX_ITEMS
    for item in items:
        answer = item["choices"][item["label"]]
        assert len(set(item["choices"])) == stdlib_task.CHOICES
        assert not re.search(rf"\b{re.escape(answer)}\b", item["docstring"], flags=re.IGNORECASE)
    assert {item["label"] for item in items} == set(range(stdlib_task.CHOICES))
    monkeypatch.setattr(stdlib_task, "cache_root", lambda: tmp_path)
    folder = stdlib_task.materialize()
    lines = (folder / f"{stdlib_task.TASK_NAME}.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == items  # a second build gives the same items
    spec = yaml.safe_load((folder / f"{stdlib_task.TASK_NAME}.yaml").read_text())
    assert Path(spec["dataset_kwargs"]["data_files"]["test"]).is_absolute()
    stamp = (folder / f"{stdlib_task.TASK_NAME}.jsonl").stat().st_mtime_ns
    assert stdlib_task.materialize() == folder
    assert (folder / f"{stdlib_task.TASK_NAME}.jsonl").stat().st_mtime_ns == stamp  # built once
    manager = lm_eval_bridge.task_manager([stdlib_task.TASK_NAME], [])
    assert stdlib_task.TASK_NAME in manager.all_tasks
