"""`semalign eval`: lm-evaluation-harness tasks on Hugging Face checkpoints, through lm-eval's Python API.

A run directory: the student before (the config's student.path), after (<run>/student) and the teacher
(teacher.path, scored once: cached by its weights fingerprint, the task's files and the settings); the scores are
merged into the run's eval.json (key "lm_eval") and eval.md (a marked section) and logged to the run's MLflow run.
A bare checkpoint: scored alone, written only into a directory the user names (`--out`), never next to it.
Tasks: lm-eval's own by name (their data sets come from a hub: run those where it is reachable), local YAML tasks
under eval.lm_eval.include_path, and the shipped `stdlib_docmodule` (stdlib_task.py) and `stdlib_keyword`
(keyword_task.py: a task a pretrained teacher is well above chance on and the demo student is not). Models load
on an explicit device and dtype, trust_remote_code only where the config turns it on; prompts longer than a
model's context lose tokens from the left (lm-eval's rule), counted and reported in one line per model.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from semalign_ds import files
from semalign_ds import config as cfgmod
from semalign_ds import tracking
from semalign_ds.evaluation import keyword_task, stdlib_task
from semalign_ds.evaluation.evaluate import format_table

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SECTION_START, SECTION_END = "<!-- semalign:lm_eval -->", "<!-- /semalign:lm_eval -->"
_SETTING_KEYS = ("limit", "num_fewshot", "n", "about")


@dataclass
class ModelSpec:
    label: str
    path: Path
    dtype: str
    trust_remote_code: bool
    key: str  # the config key the path came from (errors name it)


# ---------------------------------------------------------------- tasks and scoring

def task_manager(tasks: list[str], include_path: list[str]):
    """lm-eval's TaskManager over the local task folders (+ the shipped task when asked for); lm-eval's own
    ~15k task index only when a task is not local (indexing it takes ~10 s)."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("no lm-eval tasks: pass --tasks (e.g. --tasks stdlib_docmodule, or hellaswag,arc_easy "
                         "where their data sets can be downloaded) or set eval.lm_eval.tasks")
    paths = [Path(p).resolve() for p in include_path]
    for p in paths:
        if not p.is_dir():
            raise ValueError(f"eval.lm_eval.include_path: {str(p)!r} is not a folder of task YAMLs")
    for shipped in (stdlib_task, keyword_task):
        if shipped.TASK_NAME in tasks:
            paths.append(shipped.materialize())
    manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=False) if paths else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=[str(p) for p in paths] or None)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ValueError(f"eval.lm_eval.tasks: unknown task {missing[0]!r}; use one of lm-eval's task names (e.g. "
                         f"hellaswag, arc_easy), a task YAML in a folder listed in eval.lm_eval.include_path, or "
                         f"{stdlib_task.TASK_NAME} / {keyword_task.TASK_NAME}")
    try:  # the data sets now, before any model loads or any file is written
        manager.load(list(tasks))
    except ConnectionError as err:
        raise ValueError(f"eval.lm_eval.tasks: a task's data set is on the Hugging Face hub, which is not reachable "
                         f"here ({err}); run those tasks where it is (or with the data set in HF_DATASETS_CACHE), "
                         f"or use local tasks (eval.lm_eval.include_path, {stdlib_task.TASK_NAME})") from None
    return manager


class _TruncationCount(logging.Filter):
    """Counts (and keeps out of the console) lm-eval's one-line-per-prompt truncation warnings, and drops its
    "`pretrained` model kwarg is not of type `str`" warning: we hand HFLM a model our loader built on purpose
    (explicit device and dtype, trust_remote_code from the config), for every model scored."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "exceeds model's maximum length" in message:
            self.count += 1
            return False
        return "model kwarg is not of type `str`" not in message


def score(spec: ModelSpec, tasks: list[str], settings, manager, device: str) -> dict[str, dict]:
    """{task: {metric: value, ..., n, limit, num_fewshot}} of one checkpoint."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from semalign_ds.models.loading import load_causal_lm, load_tokenizer

    print(f"lm-eval: scoring {spec.label.replace('_', ' ')} ({spec.path}) on {', '.join(tasks)}", flush=True)
    model = load_causal_lm(spec.path, DTYPES[spec.dtype], device, spec.trust_remote_code, key=spec.key)
    tok = load_tokenizer(spec.path, spec.key, spec.trust_remote_code)
    counter, logger = _TruncationCount(), logging.getLogger("lm_eval.models.huggingface")
    logger.addFilter(counter)
    try:
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=settings.batch_size)
        out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=settings.num_fewshot, limit=settings.limit,
                              task_manager=manager, log_samples=False, bootstrap_iters=1000)
    finally:
        logger.removeFilter(counter)
    if counter.count:
        print(f"lm-eval: {spec.label}: {counter.count} prompts were longer than the model's context "
              f"({lm.max_length} tokens) and lost tokens from the left")
    return parse_results(out, settings)


def parse_results(out: dict, settings) -> dict[str, dict]:
    """lm-eval's results ("acc,none": 0.3, "acc_stderr,none": ...) as {task: {"acc": 0.3, "acc_stderr": ..., "n",
    "limit", "num_fewshot", "about": {task version, lm-eval version, the task's metadata (stdlib_docmodule: its
    Python version and data sha256)}}}."""
    scores = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # alias, name, sample_len, "N/A" stderr
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        meta = dict(out.get("configs", {}).get(task, {}).get("metadata") or {})
        meta.pop("config_source", None)  # a path on this machine
        about = {"task_version": out.get("versions", {}).get(task), "lm_eval": out.get("lm_eval_version"), **meta}
        scores[task] = {**row, "n": n, "limit": settings.limit, "num_fewshot": settings.num_fewshot, "about": about}
    return scores


# ---------------------------------------------------------------- the teacher's cache

def _task_files(manager, task: str) -> str:
    """What defines a task: lm-eval's version for its own, the bytes of the task's folder for a local one."""
    from importlib.metadata import version

    entry = manager.task_index.get(task)
    folder = entry.yaml_path.parent if entry is not None and entry.yaml_path else None
    if folder is None or "lm_eval" in folder.parts:
        return f"lm_eval=={version('lm_eval')}"
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def cache_key(spec: ModelSpec, task: str, settings, manager, device: str) -> str:
    from importlib.metadata import version

    from semalign_ds.transport.schema import model_fingerprint

    what = {"weights": model_fingerprint(spec.path), "dtype": spec.dtype, "device": device, "task": task,
            "task_files": _task_files(manager, task), "lm_eval": version("lm_eval"), "limit": settings.limit,
            "num_fewshot": settings.num_fewshot, "batch_size": settings.batch_size}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def cached_score(spec: ModelSpec, tasks: list[str], settings, manager, device: str, cache_dir: Path) -> dict:
    """`score`, with each task's result kept in cache_dir under its `cache_key` (the teacher is scored once)."""
    keys = {t: cache_key(spec, t, settings, manager, device) for t in tasks}
    hits = {t: json.loads((cache_dir / f"{k}.json").read_text()) for t, k in keys.items()
            if (cache_dir / f"{k}.json").is_file()}
    if hits:
        print(f"lm-eval: {spec.label}: cached scores for {', '.join(sorted(hits))} ({cache_dir})")
    todo = [t for t in tasks if t not in hits]
    fresh = score(spec, todo, settings, manager, device) if todo else {}
    cache_dir.mkdir(parents=True, exist_ok=True)
    for task, row in fresh.items():
        if task in keys:
            _write_atomic(cache_dir / f"{keys[task]}.json", json.dumps(row, indent=2))
    return {**hits, **fresh}


def teacher_cache_dir() -> Path:
    return files.cache_root("lm_eval_scores")


# ---------------------------------------------------------------- files

def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def scores_table(scores: dict[str, dict[str, dict]]) -> str:
    """Markdown: a row per model, a column per task metric ("0.263 ± 0.025")."""
    columns = []
    for tasks in scores.values():
        for task, row in tasks.items():
            columns += [f"{task} {m}" for m in row if m not in _SETTING_KEYS and not m.endswith("_stderr")
                        and f"{task} {m}" not in columns]
    rows = []
    for label, tasks in scores.items():
        row = {"model": label.replace("_", " ")}
        for task, metrics in tasks.items():
            for m, v in metrics.items():
                if f"{task} {m}" in columns:
                    err = metrics.get(f"{m}_stderr")
                    row[f"{task} {m}"] = f"{v:.4f}" + (f" ± {err:.4f}" if err is not None else "")
        rows.append(row)
    return format_table(rows, ["model", *columns])


def merge_into(out_dir: Path, scores: dict[str, dict[str, dict]]) -> dict:
    """Merge `scores` into out_dir/eval.json ("lm_eval") and the marked section of eval.md; returns the section."""
    path = out_dir / "eval.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    section = data.setdefault("lm_eval", {})
    for label, tasks in scores.items():
        section.setdefault(label, {}).update(tasks)
    _write_atomic(path, json.dumps(data, indent=2))
    notes = sorted({f"{t}: limit {r['limit']:g}" for tasks in section.values() for t, r in tasks.items()
                    if r.get("limit") is not None})
    block = "\n".join([SECTION_START, "## lm-eval tasks", "", scores_table(section), *(
        ["", "Scored on part of a task: " + "; ".join(notes)] if notes else []), SECTION_END])
    md = out_dir / "eval.md"
    text = md.read_text() if md.is_file() else ""
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        text = head + block + rest.split(SECTION_END, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    _write_atomic(md, text)
    return section


def claim_out_dir(out: Path, checkpoint: Path) -> None:
    """A bare checkpoint's results go only into a directory that is absent, empty or an earlier `semalign eval`
    output of the same checkpoint (marker semalign.json, kind eval)."""
    marker, checkpoint = out / "semalign.json", str(Path(checkpoint).resolve())
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found.get("kind") == "eval" and found.get("checkpoint") == checkpoint:
            return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} exists and is not an earlier `semalign eval` output of {checkpoint}; "
                         f"name a new or empty directory (nothing was written)")
    from datetime import datetime, timezone

    from semalign_ds import __version__

    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"kind": "eval", "checkpoint": checkpoint, "semalign_version": __version__,
                                  "created": datetime.now(timezone.utc).isoformat()}, indent=2))


# ---------------------------------------------------------------- the command

def _log(tracker, scores: dict[str, dict[str, dict]], out_dir: Path) -> None:
    tracker.log_summary({f"eval/lm_eval/{task}/{label}_{m}": v for label, tasks in scores.items()
                         for task, row in tasks.items() for m, v in row.items()
                         if m not in _SETTING_KEYS and v is not None})
    tracker.log_artifact(out_dir / "eval.md")
    tracker.log_artifact(out_dir / "eval.json")


def eval_run_dir(run_dir: Path, overrides: list[str] = ()) -> dict:
    """Score student before/after and teacher of a finished run; merge into its eval files and MLflow run. Holds
    the run directory's job lock meanwhile: a run resuming there, or another eval of it, is refused by name."""
    from semalign_ds import lock

    with lock.held(run_dir, "the run directory", "eval target"):
        return _eval_run_dir(Path(run_dir), overrides)


def _eval_run_dir(run_dir: Path, overrides: list[str]) -> dict:
    cfg = cfgmod.load_config(run_dir / "config.yaml", list(overrides))
    after = run_dir / "student"
    if not (after / "config.json").is_file():
        raise ValueError(f"{run_dir} has no student/ export yet (the run has not finished); finish it with "
                         f"`semalign run`, or evaluate a checkpoint folder with --out DIR")
    from semalign_ds.cluster.distributed import resolve_device

    device, lm = resolve_device(cfg.runtime.device), cfg.eval.lm_eval
    manager = task_manager(lm.tasks, lm.include_path)
    tracker = tracking.attach_to_run_dir(run_dir, cfg.tracking.uri, tracking.run_id_from_dir(run_dir)) \
        if cfg.tracking.enabled else tracking.NullTracker()
    s = cfg.student
    scores = {"student_before": score(ModelSpec("student_before", Path(s.path), s.dtype, s.trust_remote_code,
                                                "student.path"), lm.tasks, lm, manager, device),
              "student_after": score(ModelSpec("student_after", after, s.dtype, s.trust_remote_code,
                                               "student.path"), lm.tasks, lm, manager, device)}
    if lm.teacher:
        t = cfg.teacher
        spec = ModelSpec("teacher", Path(t.path), t.dtype, t.trust_remote_code, "teacher.path")
        scores["teacher"] = cached_score(spec, lm.tasks, lm, manager, device, teacher_cache_dir())
    section = merge_into(run_dir, scores)
    _log(tracker, scores, run_dir)
    return {"lm_eval": section, "table": scores_table(section), "mlflow_run_id": tracker.run_id}


def eval_checkpoint(path: Path, out: Path | None, cfg: cfgmod.RunConfig) -> dict:
    """Score one checkpoint folder (student.dtype, runtime.device of `cfg`); results into `out` only."""
    if out is None:
        raise ValueError(f"{path} is a checkpoint, not a run directory: name where the scores go with --out DIR "
                         f"(nothing is written next to a checkpoint)")
    from semalign_ds.cluster.distributed import resolve_device

    lm = cfg.eval.lm_eval
    manager = task_manager(lm.tasks, lm.include_path)
    device = resolve_device(cfg.runtime.device)
    claim_out_dir(Path(out), Path(path))
    spec = ModelSpec("model", Path(path), cfg.student.dtype, cfg.student.trust_remote_code, "eval target")
    scores = {"model": score(spec, lm.tasks, lm, manager, device)}
    section = merge_into(Path(out), scores)
    return {"lm_eval": section, "table": scores_table(section), "mlflow_run_id": None}
