"""The shipped task `stdlib_keyword`: items from this Python's language reference, the answer masked, built once;
its plain scorer (for the quality benchmark) agrees with lm-eval's multiple_choice on a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from semalign_ds import config as cfgmod
from semalign_ds.evaluation import keyword_task as kt
from semalign_ds.evaluation import lm_eval_bridge


def test_items_are_deterministic_and_mask_their_answer():
    items = kt.build_items()
    assert len(items) >= 100 and items == kt.build_items()
    for item in items:
        answer = item["choices"][item["label"]]
        assert len(set(item["choices"])) == kt.CHOICES and set(item["choices"]) <= set(kt.KEYWORDS)
        assert f'"{answer}"' not in item["sentence"] and '"___"' in item["sentence"]
    assert {item["label"] for item in items} == set(range(kt.CHOICES))
    shots, test = kt.split(items)
    assert len(shots) == kt.SHOTS and len(test) == len(items) - kt.SHOTS
    text = kt.prompt(test[0], shots)
    assert text.count("The keyword in the blank is") == kt.SHOTS + 1 and text.endswith("The keyword in the blank is")
    assert f"is {shots[0]['choices'][shots[0]['label']]}\n\n" in text  # the examples carry their answers


@pytest.mark.parametrize("seed", range(5))
def test_a_model_that_ignores_the_sentence_scores_exactly_chance(seed):
    """Any fixed preference among keywords (e.g. a code model's prior) wins a quarter of the test items."""
    import random

    _, test = kt.split(kt.build_items())
    rank = {k: i for i, k in enumerate(random.Random(seed).sample(kt.KEYWORDS, len(kt.KEYWORDS)))}
    hits = sum(min(item["choices"], key=rank.get) == item["choices"][item["label"]] for item in test)
    assert hits * kt.CHOICES == len(test)


def test_materialized_once_with_absolute_paths(tmp_path):
    folder = kt.materialize(tmp_path)
    spec = yaml.safe_load((folder / f"{kt.TASK_NAME}.yaml").read_text())
    files = spec["dataset_kwargs"]["data_files"]
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in files.values())
    assert spec["num_fewshot"] == kt.SHOTS and spec["fewshot_split"] == "train"
    shots, test = kt.split(kt.build_items())
    assert [json.loads(x) for x in Path(files["train"]).read_text().splitlines()] == shots
    assert [json.loads(x) for x in Path(files["test"]).read_text().splitlines()] == test
    stamp = (folder / f"{kt.TASK_NAME}.jsonl").stat().st_mtime_ns
    assert kt.materialize(tmp_path) == folder and (folder / f"{kt.TASK_NAME}.jsonl").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("positions", [None, 1024])
def test_plain_scorer_agrees_with_lm_eval(tiny_pair, tmp_path, monkeypatch, positions):
    """Same prompts (three fixed examples first), same continuation: every choice's log-probability equals
    lm-eval's on the first 12 test items of a tiny random model, and so do acc and acc_norm; with the tiny pair's
    128 positions every prompt is cut from the left (lm-eval's rule), with 1024 none is and the context's cache is
    reused across the choices."""
    import torch
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from semalign_ds.models.loading import load_causal_lm, load_tokenizer

    monkeypatch.setattr(kt, "cache_root", lambda: tmp_path)
    manager = lm_eval_bridge.task_manager([kt.TASK_NAME], [])
    tok = load_tokenizer(tiny_pair["student"])
    if positions is None:
        model = load_causal_lm(tiny_pair["student"], dtype=torch.float32, device="cpu")
    else:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=positions)).eval()
    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=[kt.TASK_NAME], limit=12,
                          task_manager=manager, log_samples=True, bootstrap_iters=0)
    shots, test = kt.split(kt.build_items())
    samples = sorted(out["samples"][kt.TASK_NAME], key=lambda s: s["doc_id"])
    assert [s["doc"]["id"] for s in samples] == [item["id"] for item in test[:12]]
    for sample, item in zip(samples, test):
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert kt.choice_logprobs(model, tok, item, shots) == pytest.approx(theirs, abs=1e-4)
    mine = kt.score_items(model, tok, test[:12], shots)
    got = out["results"][kt.TASK_NAME]
    assert mine["acc"] == pytest.approx(got["acc,none"]) and mine["acc_norm"] == pytest.approx(got["acc_norm,none"])
