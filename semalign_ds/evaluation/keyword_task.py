"""The shipped local lm-eval task `stdlib_keyword`: which Python keyword fills the blank in a sentence of the
language reference?

Built from the running Python's own `pydoc_data/topics.py` (the text `help()` shows, and the demo's target domain:
English documentation the demo student never saw). Every sentence of 40-260 characters that quotes exactly one
keyword ("for", "except", "global", ...) becomes a candidate item with that keyword masked ("___"); the choices
are balanced so that ignoring the sentence scores exactly 0.25 (build_items). The first SHOTS items (a fixed
order) are the few-shot examples shown before every question (lm-eval's `fewshot_split`, sampler first_n); the
rest are the test items. Scored by lm-eval's loglikelihood of " <keyword>" after the prompt (acc, acc_norm).

Why this task: a pretrained teacher that read the Python documentation fills most blanks (Gemma 3 270M ~0.6,
SmolLM2-135M ~0.5), the demo's code-only student sits near chance, and the transfer set is the same documentation,
so the task can move with transfer. Some of its sentences come from the same topics as the demo's transfer set
(the masked keyword never appears in an item; the transfer text does contain the unmasked sentences of its
training split): it measures whether the student learned the domain, as a held-out perplexity does.

Generated at first use like stdlib_docmodule (stdlib_task.py): the YAML needs an absolute data path and the items
depend on the Python version, which the task's metadata records with the data's sha256. `score_items` scores the
same items with a plain Hugging Face model the way lm-eval's multiple_choice does (for the quality benchmark,
which scores hundreds of students and cannot start lm-eval for each); tests check that both agree.
Reading uses `ast` only: no stdlib module is imported or run.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import json
import keyword
import math
import platform
import random
import re
import shutil
import sysconfig
import tempfile
from pathlib import Path

from semalign_ds.evaluation.stdlib_task import cache_root

TASK_NAME = "stdlib_keyword"
RECIPE_VERSION = 2
CHOICES = 4
SHOTS = 3
MIN_CHARS, MAX_CHARS = 40, 260
PROMPT = "{sentence}\nThe keyword in the blank is"
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
            out.append((sentence.replace(f'"{word}"', '"___"'), word))
    return out


def build_items(stdlib: Path | None = None) -> list[dict]:
    """The task's documents (the SHOTS few-shot examples first), a pure function of the stdlib's text.

    Balanced so that a model that ignores the sentence scores exactly chance: keywords are ranked by how many
    sentences quote them and grouped in fours; every item of a group offers that group's four keywords (in a
    seeded order), and each keyword of the group is the answer of the same number of items (the group's smallest
    count). A fixed preference among keywords (a code model's prior for "in" over "nonlocal") then wins exactly a
    quarter of a group's items. The few-shot examples are sentences left over by the balancing."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    rng = random.Random(f"{TASK_NAME}-{RECIPE_VERSION}")
    by_word: dict[str, list[str]] = {}
    for sentence, word in sorted(set(_sentences(_topics(root)))):
        by_word.setdefault(word, []).append(sentence)
    for sentences in by_word.values():
        rng.shuffle(sentences)
    ranked = sorted(by_word, key=lambda w: (-len(by_word[w]), w))
    items, spare = [], []
    for g in range(0, len(ranked) - CHOICES + 1, CHOICES):
        group = ranked[g:g + CHOICES]
        m = min(len(by_word[w]) for w in group)
        rows = [(sentence, w) for w in group for sentence in by_word[w][:m]]
        spare += [(sentence, group, w) for w in group for sentence in by_word[w][m:]]
        rng.shuffle(rows)
        items += [_item(sentence, group, w, rng) for sentence, w in rows]
    if len(spare) < SHOTS or len(items) < 40:
        raise ValueError(f"{TASK_NAME}: found {len(items)} balanced keyword sentences under {root}; need at least 40 "
                         f"(a full CPython's pydoc_data/topics.py)")
    shots = [_item(sentence, group, w, rng) for sentence, group, w in rng.sample(spare, SHOTS)]
    return [dict(item, id=i) for i, item in enumerate(shots + items)]


def _item(sentence: str, group: list[str], word: str, rng: random.Random) -> dict:
    choices = rng.sample(group, len(group))
    return {"sentence": sentence, "choices": choices, "label": choices.index(word)}


def split(items: list[dict]) -> tuple[list[dict], list[dict]]:
    """(few-shot examples, test items)."""
    return items[:SHOTS], items[SHOTS:]


def prompt(item: dict, shots: list[dict]) -> str:
    """The text before " <choice>": the few-shot examples with their answers, then the question (lm-eval's layout:
    examples separated by a blank line, answer after a space)."""
    done = "".join(PROMPT.format(sentence=s["sentence"]) + " " + s["choices"][s["label"]] + "\n\n" for s in shots)
    return done + PROMPT.format(sentence=item["sentence"])


def _yaml(folder: Path, digest: str) -> str:
    meta = {"version": RECIPE_VERSION, "python": platform.python_version(), "data_sha256": digest}
    files = {"train": str(folder / f"{TASK_NAME}_shots.jsonl"), "test": str(folder / f"{TASK_NAME}.jsonl")}
    return "\n".join([
        f"task: {TASK_NAME}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {json.dumps(files)}}}",
        "test_split: test",
        "fewshot_split: train",
        f"num_fewshot: {SHOTS}",
        "fewshot_config: {sampler: first_n}",
        "output_type: multiple_choice",
        'doc_to_text: "{{sentence}}\\nThe keyword in the blank is"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{label}}"',
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        f"metadata: {json.dumps(meta)}",
        "",
    ])


def materialize(root: Path | None = None, stdlib: Path | None = None) -> Path:
    """The task folder (YAML + JSONL) for lm-eval's include_path; built once per Python version, atomically."""
    root = Path(root or cache_root())
    recipe = json.dumps([RECIPE_VERSION, CHOICES, SHOTS, MIN_CHARS, MAX_CHARS, PROMPT, KEYWORDS])
    final = root / f"{TASK_NAME}-py{platform.python_version()}-v{RECIPE_VERSION}-" \
                   f"{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"
    if (final / f"{TASK_NAME}.yaml").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TASK_NAME}-", dir=root))
    try:
        shots, test = split(build_items(stdlib))
        parts = {name: "".join(json.dumps(i, sort_keys=True) + "\n" for i in rows)
                 for name, rows in ((f"{TASK_NAME}_shots", shots), (TASK_NAME, test))}
        for name, text in parts.items():
            (tmp / f"{name}.jsonl").write_text(text)
        digest = hashlib.sha256("".join(parts.values()).encode()).hexdigest()
        (tmp / f"{TASK_NAME}.yaml").write_text(_yaml(final, digest))
        tmp.rename(final)
    except OSError:
        if not (final / f"{TASK_NAME}.yaml").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def choice_logprobs(model, tokenizer, item: dict, shots: list[dict], device="cpu") -> list[float]:
    """The summed log-probability of " <choice>" after the prompt, per choice, as lm-eval computes it: the context
    and the context + continuation tokenised whole (prefixed with BOS where the tokenizer adds one), the
    continuation's tokens being the tail of the latter; a sequence longer than the model's positions loses
    tokens from the left (lm-eval's rule). The shared context runs once (its key/value cache reused per choice)
    where every choice's tokens extend it."""
    from semalign_ds.models.loading import model_max_positions

    limit = model_max_positions(model.config) or 2048
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    context = prompt(item, shots)
    head = bos + tokenizer(context, add_special_tokens=False)["input_ids"]
    wholes = [bos + tokenizer(context + " " + c, add_special_tokens=False)["input_ids"] for c in item["choices"]]
    if all(w[:len(head)] == head and len(head) < len(w) <= limit for w in wholes):
        return _cached_logprobs(model, head, wholes, device)
    return [_logprob(model, w[-(limit + 1):], len(w) - len(head), device) for w in wholes]


def _logprob(model, ids: list[int], n: int, device) -> float:
    """log p of the last n tokens of `ids` given the ones before (one forward; only those logits computed)."""
    import torch

    ids_t = torch.tensor([ids], device=device)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids_t[:, :-1], **_keep(model, n)).logits[0, -n:].float(), -1)
    return float(logp.gather(-1, ids_t[0, -n:, None]).sum())


def _cached_logprobs(model, head: list[int], wholes: list[list[int]], device) -> list[float]:
    import copy

    import torch

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        first = model(input_ids=torch.tensor([head[:-1]], device=device), use_cache=True, **_keep(model, 1))
        past = getattr(first, name)
        out = []
        for whole in wholes:
            tail = torch.tensor([whole[len(head) - 1:]], device=device)
            logits = model(input_ids=tail[:, :-1], use_cache=True, **{name: copy.deepcopy(past)}).logits[0]
            logp = torch.log_softmax(logits.float(), -1)
            out.append(float(logp.gather(-1, tail[0, 1:, None]).sum()))
    return out


def _keep(model, n: int) -> dict:
    """Only the last n positions' logits, where the model's forward can skip the rest (a 262k-row head on every
    prompt position would dominate the cost)."""
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def score_items(model, tokenizer, items: list[dict], shots: list[dict], device="cpu") -> dict[str, float]:
    """acc and acc_norm (log-probability divided by the choice's length in characters) of a Hugging Face causal
    LM on `items`, as lm-eval's multiple_choice scores them, with the standard error of acc."""
    model.eval()
    hits = {"acc": 0, "acc_norm": 0}
    for item in items:
        scores = choice_logprobs(model, tokenizer, item, shots, device)
        hits["acc"] += int(max(range(CHOICES), key=lambda i: scores[i]) == item["label"])
        norm = [s / len(c) for s, c in zip(scores, item["choices"])]
        hits["acc_norm"] += int(max(range(CHOICES), key=lambda i: norm[i]) == item["label"])
    n = len(items)
    acc = hits["acc"] / n
    return {"acc": acc, "acc_norm": hits["acc_norm"] / n, "acc_stderr": math.sqrt(acc * (1 - acc) / max(n - 1, 1)),
            "n": n}


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]
