"""Tracking behind a small interface; the only module that imports mlflow. Rank 0 logs, other ranks get NullTracker.

Local store by default (sqlite:///<output_dir>/mlflow.db); MLFLOW_TRACKING_URI or tracking.uri override it.
A resumed run continues the same MLflow run (its id is kept in the checkpoint's progress file).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class NullTracker:
    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
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
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


class MlflowTracker(NullTracker):
    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 artifact_dir: Path | None = None):
        import mlflow

        self._mlflow = mlflow
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        exp = self._client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_dir.resolve().as_uri() if artifact_dir and uri.startswith("sqlite") else None
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
        self.uri = uri

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        batch = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(batch), 100):
            self._client.log_batch(self.run_id, params=batch[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if batch:
            self._client.log_batch(self.run_id, metrics=batch)

    def last_step(self, key: str) -> int:
        return max((m.step for m in self._client.get_metric_history(self.run_id, key)), default=0)

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), subdir)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def finish(self, status: str = "FINISHED") -> None:
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
    return MlflowTracker(resolved, experiment, run_name, run_id, artifact_dir=output_dir / "mlartifacts")
