"""Tests of semalign_ds.demo.assets on its 'tiny' scale (a few seconds to build on 2 cores)."""

import json
import shutil
import time

import pytest
import torch

from semalign_ds.demo import assets as demo
from semalign_ds.demo.assets import build_demo_assets, lr_factor, split_by_hash


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_cache")
    return root, build_demo_assets(cache_dir=root, scale="tiny", progress=False)


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_files_exist_and_jsonl_has_text(built):
    _, assets = built
    assert not assets.from_cache
    for path in [assets.teacher_path / "model.safetensors", assets.student_path / "model.safetensors",
                 assets.tokenizer_path / "tokenizer.json", assets.cache_dir / "manifest.json"]:
        assert path.is_file(), path
    for path in [assets.transfer_jsonl, assets.target_val_jsonl, assets.target_test_jsonl, assets.general_test_jsonl]:
        rows = _lines(path)
        assert rows and all(isinstance(r["text"], str) and r["text"].strip() for r in rows), path
    assert not list(assets.cache_dir.rglob("*.bin")) and not list(assets.cache_dir.rglob("*.pt"))


def test_jsonl_loads_through_datasets(built, tmp_path):
    import datasets

    _, assets = built
    ds = datasets.load_dataset("json", data_files=str(assets.target_test_jsonl), split="train",
                               cache_dir=str(tmp_path))
    assert len(ds) == len(_lines(assets.target_test_jsonl)) and "text" in ds.column_names


def test_models_and_tokenizer_load_from_disk(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, assets = built
    tok = AutoTokenizer.from_pretrained(assets.tokenizer_path)
    text = "def f(x):\n    return x  # The \"pass\" statement"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id is not None
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_path)
    student = AutoModelForCausalLM.from_pretrained(assets.student_path)
    assert teacher.config.vocab_size == student.config.vocab_size == len(tok)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(teacher) > n(student)
    ids = torch.tensor([tok(text)["input_ids"]])
    assert torch.isfinite(student(input_ids=ids).logits).all()
    assert AutoTokenizer.from_pretrained(assets.teacher_path).get_vocab() == tok.get_vocab()


def test_domains_and_splits_are_disjoint(built):
    _, assets = built
    splits = json.loads((assets.cache_dir / "data" / "splits.json").read_text())
    general = {d for ids in splits["general"].values() for d in ids}
    target = {d for ids in splits["target"].values() for d in ids}
    assert general and target and not general & target
    assert all(d.endswith(".py") and not d.startswith(("pydoc_data/", "idlelib/")) for d in general)
    assert all(d.startswith("pydoc_data/topics.py::") or ".txt#" in d for d in target)
    for dom in ("general", "target"):
        parts = [set(splits[dom][s]) for s in ("train", "validation", "test")]
        assert all(parts) and sum(map(len, parts)) == len(set.union(*parts))
    assert set(splits["transfer"]) <= set(splits["target"]["train"])
    test_texts = {r["text"] for r in _lines(assets.target_test_jsonl)}
    assert not test_texts & {r["text"] for r in _lines(assets.transfer_jsonl)}
    assert not test_texts & {r["text"] for r in _lines(assets.general_test_jsonl)}


def test_stats_report_perplexities(built):
    _, assets = built
    for role in ("teacher", "student"):
        for key in ("target_test_ppl", "general_test_ppl", "train_seconds", "steps"):
            assert assets.stats[role][key] > 0
    assert assets.stats["student"]["tokens"] < assets.stats["teacher"]["tokens"]


def test_cache_is_reused_without_retraining(built):
    root, first = built
    mtime = (first.teacher_path / "model.safetensors").stat().st_mtime_ns
    threads = torch.get_num_threads()
    start = time.perf_counter()
    again = build_demo_assets(cache_dir=root, scale="tiny", progress=False)
    assert time.perf_counter() - start < 3.0
    assert again.from_cache and again.teacher_path == first.teacher_path and again.stats == first.stats
    assert (again.teacher_path / "model.safetensors").stat().st_mtime_ns == mtime
    assert torch.get_num_threads() == threads


def test_cache_dir_from_environment(built, monkeypatch):
    """$SEMALIGN_CACHE is the root of every cache; the demo's is its demo-v1 folder there, as under ~/.cache."""
    root, first = built
    monkeypatch.setenv("SEMALIGN_CACHE", str(root.parent))
    moved = root.parent / "demo-v1"
    if not moved.exists():
        moved.symlink_to(root, target_is_directory=True)
    assert build_demo_assets(scale="tiny", progress=False).cache_dir == moved / first.cache_dir.name


def test_corrupt_cache_is_rebuilt_and_partial_build_ignored(built, tmp_path):
    root, first = built
    copy = tmp_path / first.cache_dir.name
    shutil.copytree(first.cache_dir, copy)
    (copy / "teacher" / "model.safetensors").write_bytes(b"truncated")
    partial = tmp_path / f".tmp-{first.cache_dir.name}-leftover"
    partial.mkdir()
    key = first.cache_dir.name.split("-", 1)[1]
    assert demo.read_valid_manifest(copy, key) is None
    rebuilt = build_demo_assets(cache_dir=tmp_path, scale="tiny", progress=False)
    assert not rebuilt.from_cache and rebuilt.cache_dir == copy
    assert demo.read_valid_manifest(copy, key) is not None and not partial.exists()
    assert (copy / "teacher" / "model.safetensors").stat().st_size > 1000


def test_unknown_scale_is_refused(tmp_path):
    with pytest.raises(ValueError, match="scale='huge'"):
        build_demo_assets(cache_dir=tmp_path, scale="huge")


def test_split_by_hash_is_stable_and_complete():
    docs = [(f"doc{i}", f"text {i}") for i in range(200)]
    a, b = split_by_hash(docs, (0.9, 0.05, 0.05)), split_by_hash(list(reversed(docs)), (0.9, 0.05, 0.05))
    assert a == b and [len(a[s]) for s in ("train", "validation", "test")] == [180, 10, 10]
    small = split_by_hash(docs[:3], (0.9, 0.05, 0.05))
    assert all(len(v) == 1 for v in small.values())
    with pytest.raises(ValueError, match="at least 3"):
        split_by_hash(docs[:2], (0.9, 0.05, 0.05))


def test_lr_schedule_warms_up_then_decays():
    total = 100
    values = [lr_factor(s, total, 0.1, 0.1) for s in range(total)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(values[9:], values[10:])) and values[-1] >= 0.1
