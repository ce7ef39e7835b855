"""The shipped local lm-eval task `stdlib_docmodule`: "which standard-library module does this docstring belong to?"

Four-way multiple choice built from the running Python's own standard library (no download, as the demo's corpus):
every public top-level module or package with a docstring gives its module docstring and the docstrings of its
first public classes/functions (at most ITEMS_PER_MODULE items per module). The module's own name is masked in
the text ("this module"); the three wrong choices are other module names drawn with a fixed seed. Scored by
lm-eval's loglikelihood of " <module name>" after the prompt (acc, acc_norm); chance is 0.25.

Why generated at first use instead of shipped: lm-eval reads a YAML task's `data_files` relative to the current
directory, so the YAML must carry an absolute path and is written on this machine anyway; the demo's models are
pretrained on this interpreter's stdlib, and the task comes from the same text; and no data file lives in git.
The price: the stdlib differs between Python versions, so the items do too. The files go to
`<cache>/lm_eval_tasks/stdlib_docmodule-py<X.Y.Z>-v<RECIPE>-<recipe hash>/`, and the task's metadata (in every
result) names the Python version and the sha256 of its data, so scores from different interpreters are never
silently mixed.
Reading uses `ast` only: no stdlib module is imported or run.
"""
from __future__ import annotations

import ast
import hashlib
import json
import platform
import random
import re
import shutil
import sysconfig
import tempfile
from pathlib import Path

from semalign_ds import files

TASK_NAME = "stdlib_docmodule"
RECIPE_VERSION = 1
ITEMS_PER_MODULE = 3
MAX_ITEMS = 300
MAX_CHARS = 200
CHOICES = 4
_SKIP = {"test", "tests", "idlelib", "pydoc_data", "encodings", "site-packages", "lib2to3", "this", "antigravity"}


def cache_root() -> Path:
    return files.cache_root("lm_eval_tasks")


def _module_files(root: Path) -> list[tuple[str, Path]]:
    found = []
    for p in sorted(root.iterdir(), key=lambda q: q.name):
        name = p.stem if p.suffix == ".py" else p.name
        if name.startswith("_") or name in _SKIP or not name.isidentifier():
            continue
        source = p if p.suffix == ".py" else p / "__init__.py"
        if source.is_file():
            found.append((name, source))
    return found


def _clean(doc: str, module: str) -> str:
    """First paragraphs up to MAX_CHARS (cut at a word), one line, the module's name masked."""
    text = " ".join(" ".join(doc.split("\n\n")[:2]).split())
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS].rsplit(" ", 1)[0] + " ..."
    return re.sub(rf"\b{re.escape(module)}\b", "this module", text, flags=re.IGNORECASE)


def _docstrings(module: str, source: Path) -> list[str]:
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    docs = [ast.get_docstring(tree)]
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and not node.name.startswith("_"):
            docs.append(ast.get_docstring(node))
    cleaned = [_clean(d, module) for d in docs if d]
    return [d for d in cleaned if len(d) >= 30][:ITEMS_PER_MODULE]


def build_items(stdlib: Path | None = None) -> list[dict]:
    """The task's documents, a pure function of the stdlib's text (sorted walk, seeded choices)."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    per_module = [(name, doc) for name, source in _module_files(root) for doc in _docstrings(name, source)]
    names = sorted({name for name, _ in per_module})
    if len(names) < CHOICES:
        raise ValueError(f"{TASK_NAME}: found {len(names)} documented modules under {root}; need at least "
                         f"{CHOICES} (a full CPython standard library)")
    rng = random.Random(f"{TASK_NAME}-{RECIPE_VERSION}")
    picked = sorted(rng.sample(range(len(per_module)), min(MAX_ITEMS, len(per_module))))
    items = []
    for i in picked:
        module, doc = per_module[i]
        choices = rng.sample([n for n in names if n != module], CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices.insert(label, module)
        items.append({"id": len(items), "docstring": doc, "choices": choices, "label": label})
    return items


def _yaml(data: Path, digest: str) -> str:
    meta = {"version": RECIPE_VERSION, "python": platform.python_version(), "data_sha256": digest}
    return "\n".join([
        f"task: {TASK_NAME}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "Python standard library docstring: {{docstring}}\\nModule:"',
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
    recipe = [RECIPE_VERSION, ITEMS_PER_MODULE, MAX_ITEMS, MAX_CHARS, CHOICES, sorted(_SKIP)]
    return write_task(Path(root or cache_root()), TASK_NAME, RECIPE_VERSION, recipe, lambda: build_items(stdlib),
                      lambda final, digest: _yaml(final / f"{TASK_NAME}.jsonl", digest))


def write_task(root: Path, name: str, version: int, recipe, items, yaml_text) -> Path:
    """A shipped task's folder `<root>/<name>-py<python>-v<version>-<recipe hash>` (its items as JSONL, and
    yaml_text(final folder, sha256 of the JSONL) as its YAML), built once in a temporary folder and renamed into
    place: a concurrent build that wins the race is kept."""
    tag = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:8]
    final = root / f"{name}-py{platform.python_version()}-v{version}-{tag}"
    if (final / f"{name}.yaml").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        lines = "".join(json.dumps(item, sort_keys=True) + "\n" for item in items())
        (tmp / f"{name}.jsonl").write_text(lines)
        (tmp / f"{name}.yaml").write_text(yaml_text(final, hashlib.sha256(lines.encode()).hexdigest()))
        tmp.rename(final)
    except OSError:
        if not (final / f"{name}.yaml").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
