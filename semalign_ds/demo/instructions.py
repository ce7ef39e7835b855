"""The chat demo's instruction set, built on this machine: questions on the Python standard library, answered from
its own source, and "what does this code print" answered by running the code.

Nothing is downloaded. The stdlib's public top-level modules are read with `ast` (nothing of theirs is imported or
run):
- docstring questions ("What does `textwrap.dedent` do?", a few phrasings) on public functions and classes, answered
  with the first paragraph of their docstring (whitespace collapsed, at most ANSWER_CHARS characters, cut at a
  sentence end; too short or too long ones are skipped);
- a follow-up in the same conversation on a share of them (multi-turn): "What arguments does it take?", answered
  with the signature `ast.unparse` writes;
- snippet questions: short programs generated here from templates with seeded values, answered with what they
  print (run with `exec` in a fresh namespace, stdout captured: only code this module wrote is run).
A share of the conversations opens with a system message. Every item goes to test, validation or train by a stable
hash of its id (RECIPE's fractions), so adding items never moves old ones; settings are chosen on validation.
The files (`messages` JSONL records with an `id`) are written once under <root>/chat-<key>/ (key: the recipe and
the Python version), into a temporary folder renamed into place with its manifest; a complete folder is reused.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import platform
import random
import re
import shutil
import sysconfig
import tempfile
from pathlib import Path

from semalign_ds.files import cache_lock

RECIPE = {"version": 2, "seed": 20261, "answer_chars": 240, "min_answer_chars": 24, "max_doc_items": 700,
          "snippets": 320, "follow_up_share": 0.25, "system_share": 0.3, "test_fraction": 0.1,
          "validation_fraction": 0.05}
SPLITS = ("train", "validation", "test")
SYSTEM = "You are a concise assistant. Answer questions about Python and its standard library in a sentence or two."
QUESTIONS = ("What does `{name}` do?", "Explain briefly what `{name}` is for.",
             "In Python's standard library, what is `{name}`?", "What is the purpose of `{name}`?")
FOLLOW_UP = "What arguments does it take?"
SNIPPET_QUESTION = "What does this Python code print?\n\n```python\n{code}\n```"
_SKIP = {"test", "tests", "idlelib", "pydoc_data", "encodings", "site-packages", "lib2to3", "this", "antigravity",
         "turtledemo", "tkinter", "ensurepip", "venv"}
_WORDS = ("apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "pixel", "lemon", "spark")


# ---------------------------------------------------------------- docstring questions


def _modules(root: Path) -> list[tuple[str, Path]]:
    found = []
    for p in sorted(root.iterdir(), key=lambda q: q.name):
        name = p.stem if p.suffix == ".py" else p.name
        source = p if p.suffix == ".py" else p / "__init__.py"
        if not name.startswith("_") and name not in _SKIP and name.isidentifier() and source.is_file():
            found.append((name, source))
    return found


def _answer(doc: str | None, recipe: dict) -> str | None:
    """The docstring's first paragraph on one line, cut at a sentence end within answer_chars; None if unusable."""
    if not doc:
        return None
    text = " ".join(doc.strip().split("\n\n")[0].split())
    if len(text) > recipe["answer_chars"]:
        ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", text[:recipe["answer_chars"] + 1])]
        text = text[:ends[-1]].strip() if ends else ""
    return text if len(text) >= recipe["min_answer_chars"] else None


def _signature(module: str, node: ast.AST) -> str | None:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    args = ast.unparse(node.args)
    return f"`{module}.{node.name}({args})`" + ("" if args else ": it takes no arguments")


def doc_items(root: Path, recipe: dict) -> list[dict]:
    """{id, name, answer, signature} for every public top-level function or class with a usable docstring."""
    items = []
    for module, source in _modules(root):
        try:
            tree = ast.parse(source.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or \
                    node.name.startswith("_"):
                continue
            answer = _answer(ast.get_docstring(node), recipe)
            if answer:
                items.append({"id": f"doc:{module}.{node.name}", "name": f"{module}.{node.name}", "answer": answer,
                              "signature": _signature(module, node)})
    ranked = sorted(items, key=lambda item: _unit_hash(item["id"]))
    return sorted(ranked[:recipe["max_doc_items"]], key=lambda item: item["id"])


# ---------------------------------------------------------------- snippet questions


def _snippet(rng: random.Random) -> str:
    w, a, b = rng.choice(_WORDS), rng.randint(2, 30), rng.randint(2, 9)
    templates = (
        lambda: f"print(len({w!r}))",
        lambda: f"print({w!r}.upper())",
        lambda: f"print({w!r}[::-1])",
        lambda: f"print({w!r}.count({w[1]!r}))",
        lambda: f"print({a} * {b} + {rng.randint(0, 9)})",
        lambda: f"print({a} // {b}, {a} % {b})",
        lambda: f"print(sorted({rng.sample(range(50), 4)}))",
        lambda: f"print(sum({rng.sample(range(20), 3)}))",
        lambda: f"x = {rng.sample(range(10), 3)}\nx.append({a})\nprint(x)",
        lambda: f"print(', '.join({rng.sample(_WORDS, 3)}))",
        lambda: f"print(list(range({b}, {b + rng.randint(2, 5)})))",
        lambda: f"d = {dict(zip(rng.sample(_WORDS, 3), rng.sample(range(10), 3)))}\nprint(max(d, key=d.get))",
    )
    return rng.choice(templates)()


def run_snippet(code: str) -> str:
    """What a generated snippet prints (stdout, stripped); run in a fresh namespace."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<snippet>", "exec"), {"__builtins__": __builtins__})  # noqa: S102  our own snippets
    return out.getvalue().strip()


def snippet_items(recipe: dict) -> list[dict]:
    rng, items, seen = random.Random(recipe["seed"]), [], set()
    while len(items) < recipe["snippets"]:
        code = _snippet(rng)
        if code not in seen:
            seen.add(code)
            items.append({"id": f"snippet:{code}", "code": code, "output": run_snippet(code)})
    return items


# ---------------------------------------------------------------- conversations and splits


def _unit_hash(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12


def conversation(item: dict, rng: random.Random, recipe: dict) -> dict:
    """One item as a `messages` record (with its id)."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < recipe["system_share"] else []
    if "code" in item:
        messages += [{"role": "user", "content": SNIPPET_QUESTION.format(code=item["code"])},
                     {"role": "assistant", "content": f"It prints `{item['output']}`."}]
    else:
        messages += [{"role": "user", "content": rng.choice(QUESTIONS).format(name=item["name"])},
                     {"role": "assistant", "content": item["answer"]}]
        if item["signature"] and rng.random() < recipe["follow_up_share"]:
            messages += [{"role": "user", "content": FOLLOW_UP}, {"role": "assistant", "content": item["signature"]}]
    return {"id": item["id"], "messages": messages}


def _split(record_id: str, recipe: dict) -> str:
    u, test = _unit_hash(record_id), recipe["test_fraction"]
    return "test" if u < test else "validation" if u < test + recipe["validation_fraction"] else "train"


def build_records(root: Path, recipe: dict = RECIPE) -> dict[str, list[dict]]:
    """{'train': [...], 'validation': [...], 'test': [...]} conversations, deterministic for a recipe and a Python
    version."""
    items = doc_items(root, recipe) + snippet_items(recipe)
    rng = random.Random(recipe["seed"] + 1)
    records = [conversation(item, rng, recipe) for item in items]
    order = sorted(records, key=lambda r: _unit_hash("order:" + r["id"]))  # mix the kinds
    return {split: [r for r in order if _split(r["id"], recipe) == split] for split in SPLITS}


def key_of(recipe: dict) -> str:
    blob = json.dumps({"recipe": recipe, "python": platform.python_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_instruction_set(root: Path, recipe: dict = RECIPE) -> dict[str, Path]:
    """The train/validation/test JSONL files under <root>/chat-<key>/, built once (file lock; temporary folder
    renamed)."""
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"chat-{key_of(recipe)}"
    paths = {split: folder / f"{split}.jsonl" for split in SPLITS}
    with cache_lock(root / f".{folder.name}.lock"):
        if (folder / "manifest.json").is_file():
            return paths
        shutil.rmtree(folder, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=root))
        try:
            records = build_records(Path(sysconfig.get_paths()["stdlib"]), recipe)
            for split, rows in records.items():
                with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            manifest = {"recipe": recipe, "python": platform.python_version(),
                        **{f"{s}_conversations": len(rows) for s, rows in records.items()}}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return paths
