"""MLflow tracking on real sqlite stores in tmp dirs: portable run directories, the student as a LoggedModel,
run-level summaries, run names, a configured server's artifact root."""
import shutil
from pathlib import Path

import mlflow
import pytest
import transformers as tr

from semalign_ds import config as cfgmod
from semalign_ds import tracking


def _run_dir(tmp_path: Path, store, name="run") -> tuple[Path, str]:
    out = store(tmp_path / name)
    tracker = tracking.make_tracker(True, True, None, "semalign", "test", out)
    (out / "note.txt").write_text("hello")
    tracker.log_artifact(out / "note.txt")
    tracker.finish()
    return out, tracker.run_id


def _artifacts(run_dir: Path, run_id: str) -> list[str]:
    return [a.path for a in mlflow.MlflowClient(tracking.local_store_uri(run_dir)).list_artifacts(run_id)]


def test_a_moved_run_directory_lists_its_artifacts_after_relink(tmp_path, store):
    out, run_id = _run_dir(tmp_path, store)
    assert _artifacts(out, run_id) == ["note.txt"]
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    assert _artifacts(moved, run_id) == []  # the store still points at the old place: the bug being fixed
    assert tracking.relink(moved) > 0
    assert _artifacts(moved, run_id) == ["note.txt"]
    local = mlflow.MlflowClient(tracking.local_store_uri(moved)).download_artifacts(run_id, "note.txt", str(tmp_path))
    assert Path(local).read_text() == "hello"
    assert tracking.relink(moved) == 0  # already in place


def test_a_copied_run_directory_points_at_its_own_files(tmp_path, store):
    out, run_id = _run_dir(tmp_path, store)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "mlartifacts" / run_id / "artifacts" / "note.txt").write_text("the copy")
    # reopening the copy for a resumed run relinks it (make_tracker on the directory's own store)
    tracking.make_tracker(True, True, None, "semalign", "test", copy, run_id=run_id).finish()
    local = mlflow.MlflowClient(tracking.local_store_uri(copy)).download_artifacts(run_id, "note.txt", str(tmp_path))
    assert Path(local).read_text() == "the copy"


def test_a_configured_store_keeps_its_own_artifact_root(tmp_path, store):
    server = f"sqlite:///{store(tmp_path / 'server') / 'mlflow.db'}"
    tracker = tracking.make_tracker(True, True, server, "semalign", "test", tmp_path / "run")
    exp = mlflow.MlflowClient(server).get_experiment_by_name("semalign")
    assert str(tmp_path / "run") not in exp.artifact_location  # the store decides, not the run directory
    tracker.finish()


def _tiny_checkpoint(path: Path) -> Path:
    config = tr.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
    tr.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("mode, stored", [("auto", "copied"), ("link", "linked")])
def test_the_student_is_a_logged_model_linked_both_ways(tmp_path, store, mode, stored):
    out = store(tmp_path / "run")
    tracker = tracking.make_tracker(True, True, None, "semalign", "test", out)
    export = _tiny_checkpoint(out / "student")
    model_id = tracker.log_student_model(export, mode=mode, copy_max_mb=100, step=7)
    tracker.finish()
    client = mlflow.MlflowClient(tracking.local_store_uri(out))
    model = client.get_logged_model(model_id)
    assert model.source_run_id == tracker.run_id and str(model.status).endswith("READY")
    assert model.tags["semalign.storage"] == stored
    outputs = client.get_run(tracker.run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(model_id, 7)]
    files = {a.path for a in client.list_logged_model_artifacts(model_id)}
    assert ("model.safetensors" in files) == (stored == "copied")
    # moved: the linked path and the copied files follow the directory
    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))
    tracking.relink(moved)
    client = mlflow.MlflowClient(tracking.local_store_uri(moved))
    assert client.get_logged_model(model_id).tags["semalign.checkpoint_dir"] == str((moved / "student").resolve())
    if stored == "copied":
        assert "config.json" in {a.path for a in client.list_logged_model_artifacts(model_id)}


def test_auto_links_a_student_over_the_size_threshold_and_never_logs_nothing(tmp_path, store, capsys):
    out = store(tmp_path / "run")
    tracker = tracking.make_tracker(True, True, None, "semalign", "test", out)
    export = _tiny_checkpoint(out / "student")
    model_id = tracker.log_student_model(export, mode="auto", copy_max_mb=0.001)
    assert "MiB" in capsys.readouterr().out
    assert tracker._client.get_logged_model(model_id).tags["semalign.storage"] == "linked"
    assert tracker.log_student_model(export, mode="never") is None
    with pytest.raises(ValueError, match="config.json"):
        tracker.log_student_model(tmp_path, mode="copy")
    tracker.finish()


def test_summaries_are_logged_once(tmp_path, store):
    tracker = tracking.make_tracker(True, True, None, "semalign", "test", store(tmp_path / "run"))
    tracker.log_summary({"summary/wall_s": 12.5, "summary/teacher_passes_per_sample": 1.0})
    tracker.log_summary({"summary/wall_s": 12.5})  # a continued run logging the same summary again
    history = tracker._client.get_metric_history(tracker.run_id, "summary/wall_s")
    assert [(m.value, m.step) for m in history] == [(12.5, 0)]


def test_eval_attaches_without_changing_the_run_status(tmp_path, store):
    out, run_id = _run_dir(tmp_path, store)
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "run.json").write_text(f'{{"mlflow_run_id": "{run_id}"}}')
    assert tracking.run_id_from_dir(out) == run_id
    attached = tracking.attach_to_run_dir(out, None, tracking.run_id_from_dir(out))
    attached.log_summary({"eval/x": 0.5})
    attached.finish()
    run = attached._client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["eval/x"] == 0.5
    with pytest.raises(ValueError, match="not in the tracking store"):
        tracking.attach_to_run_dir(out, None, "0123456789abcdef0123456789abcdef")


def test_run_names_say_the_method_and_the_topology():
    base = cfgmod.config_from_dict({"name": "demo"})
    assert tracking.run_name(base, 1) == "demo | relation_geometry+kl+ce [best] | full | colocated x1"
    other = cfgmod.config_from_dict({"name": "demo", "method": {"layer_objective": "cosine", "w_label": 0},
                                     "schedule": {"adapter": "lora", "mode": "frontier"}, "runtime": {"topology": "spool"}})
    assert tracking.run_name(other, 4) == "demo | cosine+kl [best + 4 overrides] | frontier/lora | spool x4"
    sft = cfgmod.config_from_dict({"name": "demo", "method": {"preset": "sft"}})
    assert tracking.run_name(sft, 1) == "demo | ce [sft] | full | colocated x1"  # CE once, no teacher term


def test_relink_refuses_a_store_whose_schema_it_does_not_know(tmp_path):
    """relink edits MLflow's sqlite columns (no API moves artifact locations): a schema without them is refused by
    name before anything is written."""
    import sqlite3

    db = tmp_path / "mlflow.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE experiments (experiment_id INTEGER, artifact_root TEXT)")  # a renamed column
    con.commit()
    con.close()
    before = db.read_bytes()
    with pytest.raises(ValueError, match=r"lacks experiments\.\['artifact_location'\]"):
        tracking.relink(tmp_path)
    assert db.read_bytes() == before
