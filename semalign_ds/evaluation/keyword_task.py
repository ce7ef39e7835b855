"""The shipped local lm-eval task `stdlib_keyword`: which Python keyword fills the blank in a sentence of the
language reference?

Built from the running Python's own `pydoc_data/topics.py` (the text `help()` shows, and the demo's target domain:
English documentation the demo student never saw). Every sentence of 40-260 characters that quotes exactly one
keyword ("for", "except", "global", ...), once, becomes a candidate item with that keyword masked ("___"). Scored like
Winogrande ("partial" scoring, lm-eval's multiple-input multiple_choice): for each of the four keywords the
sentence's text up to the blank with that keyword in it is the context, and the rest of the sentence the
continuation; the keyword that makes the rest of the sentence most likely wins (acc). A keyword's own prior does
not enter the score, and the choices are balanced (build_items) so that ignoring the sentence scores exactly 0.25.

Why this task: a pretrained model that read the Python documentation is well above chance (see docs/RESULTS.md),
the demo's code-only student is at chance, and the transfer set is the same documentation, so the task can move
with transfer. Some of its sentences come from the same topics as the demo's transfer set (the masked keyword never
appears in an item; the transfer text does contain the unmasked sentences of its training split): it measures
whether the student learned the domain, as a held-out perplexity does.

Generated at first use like stdlib_docmodule (stdlib_task.py): the YAML needs an absolute data path and the items
depend on the Python version, which the task's metadata records with the data's sha256. `score_items` scores the
same items with a plain Hugging Face model the way lm-eval does (for the quality benchmark, which scores hundreds
of students and cannot start lm-eval for each); tests check that both agree choice by choice.
Reading uses `ast` only: no stdlib module is imported or run.
"""
from __future__ import annotations

import ast
import inspect
import json
import keyword
import math
import platform
import random
import re
import sysconfig
from pathlib import Path

from semalign_ds.evaluation.stdlib_task import cache_root, write_task

TASK_NAME = "stdlib_keyword"
RECIPE_VERSION = 3
CHOICES = 4
MIN_CHARS, MAX_CHARS = 40, 260
KEYWORDS = tuple(k for k in keyword.kwlist if k.isidentifier() and not k.startswith("_"))


def _topics(stdlib: Path) -> dict[str, str]:
    path = stdlib / "pydoc_data" / "topics.py"
    if not path.is_file():
        raise ValueError(f"{TASK_NAME} needs {path} (the language reference help() shows); install a full CPython")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "topics" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{path} has no 'topics = {{...}}' assignment; this Python's pydoc_data is unexpected")


def _sentences(topics: dict[str, str]) -> list[tuple[str, str]]:
    """(sentence with its one quoted keyword masked, the keyword), in topic order."""
    out = []
    for name in sorted(topics):
        for sentence in re.split(r"(?<=[.])\s+", " ".join(topics[name].split())):
            quoted = {k for k in KEYWORDS if f'"{k}"' in sentence}
            if len(quoted) != 1 or not MIN_CHARS < len(sentence) < MAX_CHARS or "::=" in sentence or "***" in sentence:
                continue
            word = quoted.pop()
            if sentence.count(f'"{word}"') == 1 and "___" not in sentence:  # one blank
                out.append((sentence.replace(f'"{word}"', '"___"'), word))
    return out


def build_items(stdlib: Path | None = None) -> list[dict]:
    """The task's documents, a pure function of the stdlib's text.

    Balanced so that a model that ignores the sentence scores exactly chance: keywords are ranked by how many
    sentences quote them and grouped in fours; every item of a group offers that group's four keywords (in a
    seeded order), and each keyword of the group is the answer of the same number of items (the group's smallest
    count)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    rng = random.Random(f"{TASK_NAME}-{RECIPE_VERSION}")
    by_word: dict[str, list[str]] = {}
    for sentence, word in sorted(set(_sentences(_topics(root)))):
        by_word.setdefault(word, []).append(sentence)
    for sentences in by_word.values():
        rng.shuffle(sentences)
    ranked = sorted(by_word, key=lambda w: (-len(by_word[w]), w))
    items = []
    for g in range(0, len(ranked) - CHOICES + 1, CHOICES):
        group = ranked[g:g + CHOICES]
        m = min(len(by_word[w]) for w in group)
        rows = [(sentence, w) for w in group for sentence in by_word[w][:m]]
        rng.shuffle(rows)
        items += [_item(sentence, group, w, rng) for sentence, w in rows]
    if len(items) < 40:
        raise ValueError(f"{TASK_NAME}: found {len(items)} balanced keyword sentences under {root}; need at least 40 "
                         f"(a full CPython's pydoc_data/topics.py)")
    return [dict(item, id=i) for i, item in enumerate(items)]


def _item(sentence: str, group: list[str], word: str, rng: random.Random) -> dict:
    choices = rng.sample(group, len(group))
    before, after = sentence.split("___", 1)
    return {"sentence": sentence, "choices": choices, "label": choices.index(word),
            "contexts": [before + c for c in choices], "continuation": after}


def _yaml(folder: Path, digest: str) -> str:
    meta = {"version": RECIPE_VERSION, "python": platform.python_version(), "data_sha256": digest}
    return "\n".join([
        f"task: {TASK_NAME}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(folder / f'{TASK_NAME}.jsonl'))}}}}}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: label",  # an int: lm-eval's multiple-input mode, one context per choice (Winogrande's)
        "doc_to_choice: contexts",
        "doc_to_target: continuation",
        'target_delimiter: ""',
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        f"metadata: {json.dumps(meta)}",
        "",
    ])


def materialize(root: Path | None = None, stdlib: Path | None = None) -> Path:
    """The task folder (YAML + JSONL) for lm-eval's include_path; built once per Python version, atomically."""
    recipe = [RECIPE_VERSION, CHOICES, MIN_CHARS, MAX_CHARS, KEYWORDS]
    return write_task(Path(root or cache_root()), TASK_NAME, RECIPE_VERSION, recipe, lambda: build_items(stdlib),
                      _yaml)


def choice_logprobs(model, tokenizer, item: dict, device="cpu") -> list[float]:
    """Per choice, the summed log-probability of the sentence's rest after its context (the text up to the blank
    with that keyword), as lm-eval computes it: the context and the context + continuation tokenised whole
    (prefixed with BOS where the tokenizer adds one), the continuation's tokens being the tail of the latter; a
    sequence longer than the model's positions loses tokens from the left (lm-eval's rule)."""
    from semalign_ds.models.loading import model_max_positions

    limit = model_max_positions(model.config) or 2048
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    out = []
    for context in item["contexts"]:
        head = bos + tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = bos + tokenizer(context + item["continuation"], add_special_tokens=False)["input_ids"]
        out.append(_logprob(model, whole[-(limit + 1):], len(whole) - len(head), device))
    return out


def _logprob(model, ids: list[int], n: int, device) -> float:
    """log p of the last n tokens of `ids` given the ones before (one forward; only those logits computed where
    the model can skip the rest: a 262k-row head on every position would dominate the cost)."""
    import torch

    keep = {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    ids_t = torch.tensor([ids], device=device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids_t[:, :-1], **keep).logits[0, -n:].float(), -1)
    return float(logp.gather(-1, ids_t[0, -n:, None]).sum())


def score_items(model, tokenizer, items: list[dict], device="cpu") -> dict[str, float]:
    """acc of a Hugging Face causal LM on `items`, as lm-eval scores them, with its standard error."""
    model.eval()
    hits = 0
    for item in items:
        scores = choice_logprobs(model, tokenizer, item, device)
        hits += int(max(range(CHOICES), key=lambda i: scores[i]) == item["label"])
    n = len(items)
    acc = hits / n
    return {"acc": acc, "acc_stderr": math.sqrt(acc * (1 - acc) / max(n - 1, 1)), "n": n}


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
