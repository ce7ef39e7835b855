"""The shipped task `stdlib_keyword`: items from this Python's language reference, the answer masked, balanced so
that ignoring the sentence scores chance, built once; its plain scorer (for the quality benchmark) agrees with
lm-eval's multiple-input multiple_choice choice by choice on a tiny model."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from semalign_ds.evaluation import keyword_task as kt
from semalign_ds.evaluation import lm_eval_bridge


def test_items_are_deterministic_and_mask_their_answer():
    items = kt.build_items()
    assert len(items) >= 100 and items == kt.build_items()
    for item in items:
        answer = item["choices"][item["label"]]
        assert len(set(item["choices"])) == kt.CHOICES and set(item["choices"]) <= set(kt.KEYWORDS)
        assert f'"{answer}"' not in item["sentence"] and item["sentence"].count("___") == 1
        assert [c + item["continuation"] for c in item["contexts"]] == [
            item["sentence"].replace("___", k) for k in item["choices"]]
    assert {item["label"] for item in items} == set(range(kt.CHOICES))


@pytest.mark.parametrize("seed", range(5))
def test_a_model_that_ignores_the_sentence_scores_exactly_chance(seed):
    """Any fixed preference among keywords (e.g. a code model's prior) wins a quarter of the items."""
    items = kt.build_items()
    rank = {k: i for i, k in enumerate(random.Random(seed).sample(kt.KEYWORDS, len(kt.KEYWORDS)))}
    hits = sum(min(item["choices"], key=rank.get) == item["choices"][item["label"]] for item in items)
    assert hits * kt.CHOICES == len(items)


def test_materialized_once_with_absolute_paths(tmp_path):
    folder = kt.materialize(tmp_path)
    spec = yaml.safe_load((folder / f"{kt.TASK_NAME}.yaml").read_text())
    data = Path(spec["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and spec["doc_to_text"] == "label" and spec["target_delimiter"] == ""
    assert [json.loads(x) for x in data.read_text().splitlines()] == kt.build_items()
    stamp = data.stat().st_mtime_ns
    assert kt.materialize(tmp_path) == folder and data.stat().st_mtime_ns == stamp


def test_plain_scorer_agrees_with_lm_eval(tiny_pair, tmp_path, monkeypatch):
    """Every choice's log-probability equals lm-eval's on the first 12 items of a tiny random model, and so does
    acc."""
    import torch
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from semalign_ds.models.loading import load_tokenizer

    monkeypatch.setattr(kt, "cache_root", lambda: tmp_path)
    manager = lm_eval_bridge.task_manager([kt.TASK_NAME], [])
    tok = load_tokenizer(tiny_pair["student"])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=1024)).eval()
    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=[kt.TASK_NAME], limit=12,
                          task_manager=manager, log_samples=True, bootstrap_iters=0)
    items = kt.build_items()
    samples = sorted(out["samples"][kt.TASK_NAME], key=lambda s: s["doc_id"])
    assert [s["doc"]["id"] for s in samples] == [item["id"] for item in items[:12]]
    for sample, item in zip(samples, items):
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert kt.choice_logprobs(model, tok, item) == pytest.approx(theirs, abs=1e-4)
    mine = kt.score_items(model, tok, items[:12])
    assert mine["acc"] == pytest.approx(out["results"][kt.TASK_NAME]["acc,none"]) and mine["n"] == 12
