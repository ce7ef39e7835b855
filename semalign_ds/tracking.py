"""Tracking behind a small interface; the only module that imports mlflow. Rank 0 logs, other ranks get NullTracker.

Local store by default (sqlite:///<output_dir>/mlflow.db, artifacts in <output_dir>/mlartifacts); MLFLOW_TRACKING_URI
or tracking.uri override it, and then artifacts go where that store or server says. A resumed run continues the same
MLflow run (its id is kept in the run directory's marker). The local store records absolute artifact URIs, so a
moved or copied run directory is relinked (`relink`) whenever semalign opens it. Metrics: per-step values on the
global optimizer step (1-based across stages), summaries once per run (`log_summary`), the exported student as an
MLflow LoggedModel (`log_student_model`).
The run directory's own store is created whole or not at all (`ensure_local_store`: built under a temporary name
and renamed): a full disk while MLflow creates its tables is one error with the bytes needed and free, and leaves
nothing a rerun trips over; a half-created store an older semalign left (no run in it) is rebuilt.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from semalign_ds import files

STORE_BYTES = 2 * 2**20  # an empty MLflow 3 sqlite store is ~0.95 MiB; its rollback journal may need as much again
log = logging.getLogger(__name__)


class NullTracker:
    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_summary(self, metrics: dict[str, float]) -> None: ...
    def log_table(self, columns: dict[str, list], artifact_file: str) -> None: ...
    def log_student_model(self, export_dir: str | Path, mode: str = "auto", copy_max_mb: float = 1024.0,
                          step: int = 0, name: str = "student") -> str | None: ...
    def finish(self, status: str = "FINISHED") -> None: ...

    def last_step(self, key: str) -> int:
        """The highest step logged for metric `key` (0 if none): a resumed run does not log a step twice."""
        return 0


def tracking_uri(configured: str | None, output_dir: Path) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    output_dir.mkdir(parents=True, exist_ok=True)
    return local_store_uri(output_dir)


def local_store_uri(output_dir: Path) -> str:
    """The run directory's own store (the default when no tracking URI is configured)."""
    return f"sqlite:///{(Path(output_dir) / 'mlflow.db').resolve()}"


def _runs_in(db: Path) -> int | None:
    """Rows of the store's runs table; None if the file is not a store with one (half-created, or not sqlite)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        try:
            return int(con.execute("SELECT count(*) FROM runs").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return None


def ensure_local_store(output_dir: Path, run_id: str | None) -> None:
    """Create `<output_dir>/mlflow.db` whole or not at all: MLflow builds its tables in a temporary file that is
    renamed into place. A store without any run in a semalign directory whose marker names no MLflow run (what a
    full disk or a kill during table creation left, before this function existed) is rebuilt."""
    db = Path(output_dir) / "mlflow.db"
    if db.is_file():
        if run_id is not None or not (Path(output_dir) / "semalign.json").is_file() or _runs_in(db):
            return
        log.warning("%s holds no MLflow run (a store whose creation was cut short): rebuilding it", db)
    import mlflow

    tmp = db.with_name(f".mlflow.db.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    scratch = [tmp, *(tmp.with_name(tmp.name + suffix) for suffix in ("-journal", "-wal", "-shm"))]
    uri = f"sqlite:///{tmp.resolve()}"
    with files.writing(db, STORE_BYTES, "creating the MLflow store", cleanup=scratch):
        files.check_free_space(db.parent, STORE_BYTES, "creating the MLflow store")
        try:
            mlflow.MlflowClient(tracking_uri=uri).search_experiments()
        finally:
            _forget_engine(uri)
        os.replace(tmp, db)


def _forget_engine(uri: str) -> None:
    """Close MLflow's cached engine of a store we renamed or removed (it would keep the file open)."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engine = SqlAlchemyStore._engine_map.pop(uri, None)
    except (ImportError, AttributeError):
        return
    if engine is not None:
        engine.dispose()


class MlflowTracker(NullTracker):
    def __init__(self, uri: str, experiment: str | None, run_name: str = "", run_id: str | None = None,
                 artifact_dir: Path | None = None, attach: bool = False):
        """A new run in `experiment`, or the run `run_id` continued (status back to RUNNING). `attach`: log into
        an existing run without touching its status (`semalign eval` on a finished run); `finish` is then a no-op.
        `artifact_dir`: where a new experiment keeps its artifacts (only for the run directory's own store)."""
        import mlflow

        self._mlflow = mlflow
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        self.uri, self._attached = uri, attach
        if run_id is not None:
            self._check_run(run_id, uri)
        if attach:
            self.run_id = run_id
            return
        exp = self._client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_dir.resolve().as_uri() if artifact_dir else None
            exp_id = self._client.create_experiment(experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        if run_id is None:
            run_id = self._client.create_run(exp_id, run_name=run_name, tags=environment_tags()).info.run_id
        else:  # a rerun continues its directory's run: RUNNING again, the last attempt's end tags cleared
            self._client.update_run(run_id, status="RUNNING")
            for tag in set(self._client.get_run(run_id).data.tags) & {"error", "stopped_by"}:
                self._client.delete_tag(run_id, tag)
        self.run_id = run_id

    def _check_run(self, run_id: str, uri: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_run(run_id)
        except MlflowException:
            raise ValueError(f"MLflow run {run_id} is not in the tracking store {uri}; use the store the run was "
                             f"logged to (tracking.uri / MLFLOW_TRACKING_URI), or unset MLFLOW_TRACKING_URI to "
                             f"use the run directory's own mlflow.db") from None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        batch = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(batch), 100):
            self._client.log_batch(self.run_id, params=batch[i:i + 100])

    def _store_path(self) -> str:
        """The store's file for messages (a sqlite store), else its URI."""
        return self.uri[len("sqlite:///"):] if self.uri.startswith("sqlite:///") else self.uri

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if batch:
            with files.writing(self._store_path(), None, "logging metrics to the MLflow store"):
                self._client.log_batch(self.run_id, metrics=batch)

    def last_step(self, key: str) -> int:
        return max((m.step for m in self._client.get_metric_history(self.run_id, key)), default=0)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        where = _uri_path(self._client.get_run(self.run_id).info.artifact_uri or str(path))
        with files.writing(where, Path(path).stat().st_size, f"copying {Path(path).name} into MLflow's artifacts"):
            self._client.log_artifact(self.run_id, str(path), subdir)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def log_summary(self, metrics: dict[str, float]) -> None:
        """Run-level metrics (one value per run, no step axis): logged once; a key already logged with the same
        value is not logged again (a continued run), a changed value is logged as the newer value."""
        logged = self._client.get_run(self.run_id).data.metrics
        fresh = {k: float(v) for k, v in metrics.items() if v is not None and logged.get(k) != float(v)}
        self.log_metrics(fresh, step=0)

    def log_table(self, columns: dict[str, list], artifact_file: str) -> None:
        """A table (column name -> equally long list of values) as an MLflow table artifact of this run (the UI's
        evaluation view reads it; `mlflow.load_table(artifact_file, run_ids=[...])` reads it back). Logging the same
        artifact_file again appends the rows (MLflow's rule), so tables logged at several evals share one file."""
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"log_table({artifact_file!r}): columns of different lengths {lengths}")
        self._client.log_table(self.run_id, columns, artifact_file)

    def log_student_model(self, export_dir: str | Path, mode: str = "auto", copy_max_mb: float = 1024.0,
                          step: int = 0, name: str = "student") -> str | None:
        """The exported student (a HF folder) as an MLflow LoggedModel of this run, linked both ways (the model's
        source run; the run's model outputs). mode `copy`: its files go into the model's artifacts (download from
        the UI); `link`: only a pointer (tag semalign.checkpoint_dir), no multi-GB copy; `auto`: copy up to
        `copy_max_mb`, else link; `never`: nothing. Returns the model id (None for never)."""
        if mode not in ("auto", "copy", "link", "never"):
            raise ValueError(f"tracking.log_model={mode!r} must be one of auto, copy, link, never")
        export_dir = Path(export_dir)
        if mode == "never":
            print(f"MLflow: the student is not logged as a model (tracking.log_model=never); it is in {export_dir}")
            return None
        if not (export_dir / "config.json").is_file():
            raise ValueError(f"log_student_model: {export_dir} is not a Hugging Face checkpoint (no config.json)")
        size_mb = sum(f.stat().st_size for f in export_dir.rglob("*") if f.is_file()) / 2**20
        copy = mode == "copy" or (mode == "auto" and size_mb <= copy_max_mb)
        model_id = self._create_model(export_dir, name, copy, size_mb)
        if copy:
            self._client.log_model_artifacts(model_id, str(export_dir))
        self._client.finalize_logged_model(model_id, "READY")
        from mlflow.entities import LoggedModelOutput

        self._client.log_outputs(self.run_id, [LoggedModelOutput(model_id, step)])
        why = "tracking.log_model=link" if mode == "link" else f"over tracking.log_model_copy_max_mb={copy_max_mb:g}"
        how = "copied into the model's artifacts" if copy else f"linked, not copied: {why}"
        print(f"MLflow: logged the student as model {model_id} ({size_mb:.1f} MiB, {how}); checkpoint {export_dir}")
        return model_id

    def _create_model(self, export_dir: Path, name: str, copy: bool, size_mb: float) -> str:
        experiment_id = self._client.get_run(self.run_id).info.experiment_id
        tags = {_RELINKED_TAG: str(export_dir.resolve()), "semalign.size_mib": f"{size_mb:.1f}",
                "semalign.storage": "copied" if copy else "linked"}
        if not copy:
            tags["mlflow.model.isExternal"] = "true"  # MLflow's own marker for a model stored outside MLflow
        model = self._client.create_logged_model(experiment_id, name=name, source_run_id=self.run_id, tags=tags,
                                                 model_type="transformers-causal-lm")
        return model.model_id

    def finish(self, status: str = "FINISHED") -> None:
        if not self._attached:
            self._client.set_terminated(self.run_id, status=status)


def environment_tags() -> dict[str, str]:
    """What a later reader needs to repeat the run: package versions, the command line and the code revision."""
    import platform
    import subprocess
    import sys
    from importlib.metadata import PackageNotFoundError, version

    tags = {"python": platform.python_version(), "command": " ".join(sys.argv), "host": platform.node()}
    for package in ("semalign_ds", "torch", "deepspeed", "transformers", "datasets", "safetensors"):
        try:
            tags[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            tags[f"version.{package}"] = "not installed"
    try:
        repo = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
        if commit:
            tags["git.commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def make_tracker(enabled: bool, is_main: bool, uri: str | None, experiment: str, run_name: str,
                 output_dir: Path, run_id: str | None = None) -> NullTracker:
    if not (enabled and is_main):
        return NullTracker()
    resolved = tracking_uri(uri, output_dir)
    if resolved != local_store_uri(output_dir):  # a server or a shared store: its artifact root decides
        return MlflowTracker(resolved, experiment, run_name, run_id)
    ensure_local_store(output_dir, run_id)
    relink(output_dir)
    with files.writing(output_dir / "mlflow.db", None, "the MLflow store"):
        return MlflowTracker(resolved, experiment, run_name, run_id, artifact_dir=output_dir / "mlartifacts")


def attach_to_run_dir(run_dir: Path, configured_uri: str | None, run_id: str | None) -> NullTracker:
    """The MLflow run a run directory owns, for logging into it afterwards (`semalign eval`): the same store the
    run used, relinked first when it is the directory's own; NullTracker when the directory has no run id."""
    if run_id is None:
        return NullTracker()
    uri = configured_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(run_dir)
    if uri == local_store_uri(run_dir):
        if not (Path(run_dir) / "mlflow.db").is_file():
            raise ValueError(f"{run_dir} names MLflow run {run_id} but has no mlflow.db; set tracking.uri (or "
                             f"MLFLOW_TRACKING_URI) to the store the run was logged to")
        relink(run_dir)
    return MlflowTracker(uri, None, run_id=run_id, attach=True)


def run_id_from_dir(run_dir: Path) -> str | None:
    """The MLflow run a run directory owns: its marker `semalign.json`, else (runs from before the marker)
    `checkpoint/run.json`'s mlflow_run_id. None when neither names one."""
    import json

    for path in (Path(run_dir) / "semalign.json", Path(run_dir) / "checkpoint" / "run.json"):
        if path.is_file():
            run_id = json.loads(path.read_text()).get("mlflow_run_id")
            if run_id:
                return str(run_id)
    return None


def run_name(cfg, world_size: int | None = None) -> str:
    """What differs between runs: `<name> | <method> | <schedule> | <topology>`, e.g.
    `demo | relation_geometry+kl+ce | frontier | colocated x1`."""
    m, s = cfg.method, cfg.schedule
    terms = [t for t, w in ((m.layer_objective, m.w_layer), (m.output_objective, m.w_out)) if t != "none" and w]
    terms += ["ce"] if m.w_label else []
    method = "+".join(terms) or "none"
    method += f" ({m.basis} basis)" if m.basis != "output" else ""
    method += f" map={m.map}" if m.map != "pinv" else ""
    label = m.preset or "no preset"
    if m.overrides:  # keys set on top of the preset (config.yaml's method.overrides names them)
        label += f" + {len(m.overrides)} override{'s' if len(m.overrides) > 1 else ''}"
    method += f" [{label}]"
    schedule = s.mode + ("/lora" if s.adapter == "lora" else "")
    topology = cfg.runtime.topology + (f" x{world_size}" if world_size else "")
    return f"{cfg.name} | {method} | {schedule} | {topology}"


_RELINKED_TAG = "semalign.checkpoint_dir"


def relink(run_dir: Path) -> int:
    """Point the run directory's own store (mlflow.db) at its mlartifacts/ where the directory is now.

    The sqlite store keeps absolute artifact URIs, written where the run first ran; after a move or a copy they
    point at the old place (moved: nothing is listed; copied: the original's files). This rewrites, in one
    transaction, every artifact location under the old `<dir>/mlartifacts` (experiments, runs, logged models, and
    the checkpoint path tag of a linked student model) to the current one. Returns the rows changed (0: already
    in place). Only the directory's own store is touched; a tracking server keeps its locations.
    """
    import sqlite3

    db = Path(run_dir) / "mlflow.db"
    if not db.is_file():
        return 0
    new = (Path(run_dir).resolve() / "mlartifacts").as_uri()
    con = sqlite3.connect(db, timeout=60)
    try:
        _check_schema(con, db)
        with con:
            olds = [row[0] for row in con.execute("SELECT artifact_location FROM experiments")
                    if row[0] and row[0].rstrip("/").endswith("/mlartifacts") and row[0].rstrip("/") != new]
            changed = sum(_rewrite(con, old.rstrip("/"), new) for old in olds)
    finally:
        con.close()
    if changed:
        _forget_cached_locations()
    return changed


# MLflow has no API that moves a run's artifact location, so relink edits these columns of its sqlite schema
# directly. They are checked before any write (a newer MLflow that renamed one gets a clear error, not a broken
# store); tests/test_lm_eval_bridge.py moves a real run directory and lists its artifacts through MLflow's API.
RELINK_COLUMNS = {"experiments": ("artifact_location",), "runs": ("artifact_uri",),
                  "logged_models": ("artifact_location",), "logged_model_tags": ("tag_key", "tag_value")}


def _check_schema(con, db: Path) -> None:
    for table, columns in RELINK_COLUMNS.items():
        have = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
        if not set(columns) <= have:
            from importlib.metadata import version

            raise ValueError(f"{db}: MLflow {version('mlflow')}'s store lacks {table}.{sorted(set(columns) - have)}, "
                             f"which `semalign mlflow-relink` rewrites; this MLflow is newer than semalign supports "
                             f"(pyproject.toml's range): install a tested MLflow, or log to a tracking server")


def _forget_cached_locations() -> None:
    """MLflow caches each run's / model's artifact repository per process; drop the stale ones after a relink."""
    try:
        from mlflow.tracking._tracking_service import utils

        utils._artifact_repos_cache.clear()
    except (ImportError, AttributeError):
        pass


def _rewrite(con, old: str, new: str) -> int:
    """Replace the prefix `old` by `new` in the store's artifact locations (and the old run dir in the tag)."""
    changed = 0
    for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                          ("logged_models", "artifact_location")):
        changed += con.execute(
            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
            f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
            (new, len(old) + 1, old, len(old) + 1, old + "/")).rowcount
    old_dir, new_dir = _uri_path(old).rsplit("/mlartifacts", 1)[0], _uri_path(new).rsplit("/mlartifacts", 1)[0]
    changed += con.execute(
        "UPDATE logged_model_tags SET tag_value = ? || substr(tag_value, ?) WHERE tag_key = ? AND "
        "substr(tag_value, 1, ?) = ?", (new_dir, len(old_dir) + 1, _RELINKED_TAG, len(old_dir) + 1,
                                        old_dir + "/")).rowcount
    return changed


def _uri_path(uri: str) -> str:
    from urllib.parse import unquote, urlparse

    return unquote(urlparse(uri).path) if uri.startswith("file:") else uri
