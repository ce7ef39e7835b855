"""The trust issue's bad inputs through `semalign` in-process (cli.main): each gets exit code 2 and one clear
line naming the key and the fix, before any model loads, and leaves every file as it was (no output directory,
no MLflow store). Also: a directory another job holds, a full disk reported in SQLite's or safetensors' words,
stale DeepSpeed build locks, fixed ports, check commands that answer in seconds. The cases that need a real run
or a real signal are in test_pipeline.py, test_signals.py and test_faults.py; the ownership rules, the job lock
and full/read-only disks in test_ownership.py. Part of the fault tier (`pytest -m faults`)."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from semalign_ds import cli, versions
from semalign_ds.run import checks, ownership
from semalign_ds import config as cfgmod
from semalign_ds.transport.schema import SCHEMA_VERSION
from test_ownership import tree
from test_pipeline import write_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.faults


@pytest.fixture
def run_cli(capsys):
    """run_cli(*args) -> (exit code, stdout, stderr) of cli.main in this process."""
    def call(*args):
        rc = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return rc, out, err
    return call


@pytest.fixture
def cfg(tmp_path, tiny_pair) -> Path:
    return write_config(tmp_path, tiny_pair)


def one_error(err: str) -> str:
    """The error line: exactly one line, `semalign: error: ...`, no traceback."""
    lines = [l for l in err.splitlines() if l and not l.startswith("[rank ")]
    assert len(lines) == 1 and lines[0].startswith("semalign: error: ") and "Traceback" not in err, err
    return lines[0]


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "run").exists()  # the output_dir of write_config: never created, so no MLflow store


def marked(directory: Path, kind: str, config_hash: str, status: str = "finished", **files: str) -> Path:
    """A directory as `semalign` leaves it: the marker and some files."""
    ownership.claim(directory, kind, config_hash)
    for name, text in files.items():
        (directory / name).write_text(text)
    ownership.update(directory, status=status)
    return directory


# ---------------------------------------------------------------- 1. nothing is overwritten


def test_teach_into_a_users_directory_is_refused_and_leaves_it_untouched(tmp_path, cfg, run_cli):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: precious\n")
    before = tree(mine)
    rc, _, err = run_cli("teach", "--config", cfg, "--out", mine)
    assert rc == 2 and f"--out (transport.spool_dir)='{mine}' is not empty (config.yaml)" in one_error(err)
    assert tree(mine) == before


def test_teach_into_a_finished_run_directory_is_refused(tmp_path, cfg, run_cli):
    run = marked(tmp_path / "done", "run", "feedfeedfeedfeed", **{"config.yaml": "a: 1\n", "eval.json": "{}"})
    before = tree(run)
    rc, _, err = run_cli("teach", "--config", cfg, "--out", run)
    assert rc == 2 and "holds a semalign run (written by `semalign run` or `semalign train`), not a spool" in \
        one_error(err)
    assert tree(run) == before


def test_teach_onto_a_complete_spool_of_another_config_is_refused_and_the_spool_stays_readable(tmp_path, cfg,
                                                                                                run_cli):
    manifest = json.dumps({"complete": True, "schema": SCHEMA_VERSION, "num_samples": 4})
    spool = marked(tmp_path / "spool", "spool", "feedfeedfeedfeed", **{"manifest.json": manifest,
                                                                        "pairing.json": '{"rows": []}'})
    before = tree(spool)
    rc, _, err = run_cli("teach", "--config", cfg, "--out", spool)
    assert rc == 2 and "holds a spool of a different configuration (config hash feedfeedfeedfeed" in one_error(err)
    assert tree(spool) == before and checks.spool_to_read(str(spool))["num_samples"] == 4


def test_teach_out_pointing_at_a_file_is_refused(tmp_path, cfg, run_cli):
    file = tmp_path / "notes.txt"
    file.write_text("keep me")
    rc, _, err = run_cli("teach", "--config", cfg, "--out", file)
    assert rc == 2 and f"--out (transport.spool_dir)='{file}' is a file, not a directory" in one_error(err)
    assert file.read_text() == "keep me"


def test_run_into_an_existing_directory_without_a_marker_is_refused(tmp_path, cfg, run_cli):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text("mine: 1\n")
    (old / "notes.md").write_text("results")
    before = tree(old)
    rc, _, err = run_cli("run", "--config", cfg, f"output_dir={old}")
    assert rc == 2 and f"output_dir='{old}' is not empty (config.yaml, notes.md)" in one_error(err)
    assert tree(old) == before


# ---------------------------------------------------------------- 2. 3. 4. 5. checked before any work


def _teacher_copy(tmp_path: Path, pair: dict, weights: str | None) -> Path:
    """The tiny teacher's config.json and tokenizer, with `weights` as its only weight file (or none)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(pair["teacher"], teacher, ignore=shutil.ignore_patterns("*.safetensors"))
    if weights:
        (teacher / weights).write_bytes(b"\x80\x02pickle")  # never opened: refused by its name
    return teacher


def _stage2_template(tmp_path: Path) -> Path:
    path = tmp_path / "teacher_stage2.json"
    path.write_text((ROOT / "ds_configs" / "teacher_zero3_offload_cpu.json").read_text().replace('"stage": 3',
                                                                                                  '"stage": 2'))
    return path


@pytest.mark.parametrize("case, needle", [
    ("schedule.grad_clip=-1", "schedule.grad_clip=-1 must be >= 0 (Gradient norm clipping (0 turns it off))"),
    ("schedule.lr=-0.001", "schedule.lr=-0.001 must be > 0"),
    ("transport.window=0", "transport.window=0 must be >= 1"),
    ("method.tau=.nan", "method.tau=nan must be a finite number"),
    ("teacher_no_weights", "teacher.path='{tmp}/teacher' has no *.safetensors weights"),
    ("teacher_bin_only", "teacher.path='{tmp}/teacher' holds weights that are not safetensors (pytorch_model.bin); "
                         "they are refused because loading them runs pickle"),
    ("student.path={tmp}/nowhere", "student.path='{tmp}/nowhere' does not exist"),
    ("data.path={tmp}/missing.jsonl", "data.path='{tmp}/missing.jsonl' matches no file"),
    ("eval.sets.extra={tmp}/missing.jsonl", "eval.sets.extra='{tmp}/missing.jsonl' matches no file"),
    ("eval.sets.odd={tmp}/config.yaml", "eval.sets.odd: the format of {tmp}/config.yaml cannot be told from its "
                                        "extension; name the file with a .jsonl, .txt or .parquet extension"),
    ("teacher_stage2", "teacher_engine.ds_config='{tmp}/teacher_stage2.json': zero_optimization.stage is 2 but the "
                       "teacher engine runs ZeRO-3 inference (stage 3)"),
    ("student_engine.ds_config=ds_configs/teacher_zero3_offload_cpu.json",
     "ds_configs/teacher_zero3_offload_cpu.json': zero_optimization.stage is 3 but the student engine runs ZeRO-2 "
     "training (stage 2)"),
    ("schedule.stages=[3]", "schedule.stages [3] out of range: the student has layers 1..2"),
])
def test_bad_input_is_one_clear_line_before_any_work(tmp_path, tiny_pair, run_cli, case, needle):
    fmt = dict(tmp=tmp_path)
    special = {"teacher_no_weights": lambda: f"teacher.path={_teacher_copy(tmp_path, tiny_pair, None)}",
               "teacher_bin_only": lambda: f"teacher.path={_teacher_copy(tmp_path, tiny_pair, 'pytorch_model.bin')}",
               "teacher_stage2": lambda: f"teacher_engine.ds_config={_stage2_template(tmp_path)}"}
    override = special[case]() if case in special else case.format(**fmt)
    cfg = write_config(tmp_path, tiny_pair)
    rc, _, err = run_cli("run", "--config", cfg, override)
    line = one_error(err)
    assert rc == 2 and needle.format(**fmt) in line, line
    assert ".path.path" not in line and "data.path.text_field" not in line
    assert_nothing_written(tmp_path)


def test_data_errors_name_the_keys_that_exist(tmp_path):
    from semalign_ds import data as datamod

    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    spec = cfgmod.config_from_dict({"data": {"path": str(tmp_path / "d.jsonl")}}).data
    with pytest.raises(ValueError, match=r"^data.text_field='text' is not a column of the data at data.path; "
                                         r"available columns: \['body'\]. Set data.text_field to one of them$"):
        datamod.load_texts(spec, "data")


def test_train_from_a_file_does_not_suggest_teaching_into_it(tmp_path, cfg, run_cli):
    file = tmp_path / "spool.tar"
    file.write_text("not a spool")
    rc, _, err = run_cli("train", "--config", cfg, "--from-spool", file)
    line = one_error(err)
    assert rc == 2 and f"transport.spool_dir (--from-spool)='{file}' is a file, not a spool directory" in line
    assert "teach --config" not in line and f"--out {file}" not in line
    assert_nothing_written(tmp_path)


def test_every_problem_is_reported_at_once(tmp_path, cfg, run_cli):
    bad = ["schedule.lr=-1", "schedule.grad_clip=-1", f"eval.sets.gone={tmp_path}/gone.jsonl",
           f"teacher.path={tmp_path}/no_teacher"]
    rc, _, err = run_cli("config", "--check", "--config", cfg, *bad)
    assert rc == 2 and err.startswith("semalign: error: 4 problems in the config:\n")
    for key in ("schedule.lr=", "schedule.grad_clip=", "eval.sets.gone=", "teacher.path="):
        assert f"\n  - {key}" in err
    rc, out, err = run_cli("config", "--check", "--config", cfg)
    assert (rc, out.strip()) == (0, "OK: the config and every path it names passed the checks"), err
    rc, _, err = run_cli("run", "--config", cfg, *bad)  # run reports the same list, before any work
    assert rc == 2 and "4 problems in the config" in err
    assert_nothing_written(tmp_path)


def test_python_callers_get_the_ranges_at_parse_time():
    with pytest.raises(ValueError, match=r"schedule.grad_clip=-1 must be >= 0"):
        cfgmod.config_from_dict({}, ["schedule.grad_clip=-1"])
    with pytest.raises(ValueError, match=r"unknown config key 'schedule.grad_clipping'"):  # still at parse time
        cfgmod.load_config_with_problems(None, ["schedule.grad_clipping=1"])


# ---------------------------------------------------------------- the command line itself


def test_version_and_help_for_every_subcommand_and_flag(run_cli, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and re.match(r"semalign \d+\.\d+\.\d+ \(deepspeed ", capsys.readouterr().out)
    parser = cli._parser()
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        for action in p._actions:
            if isinstance(action.choices, dict):  # subcommands: each has its help line
                parsers.extend(action.choices.values())
                helps = {a.dest: a.help for a in action._choices_actions}
                assert all(helps.get(name) for name in action.choices), f"{p.prog}: a subcommand has no help"
            elif action.dest != "help":
                assert action.help, f"{p.prog}: {action.dest} has no help"


def test_slurm_render_template_without_a_value_lists_the_templates(cfg, run_cli):
    rc, out, err = run_cli("slurm", "render", "--config", cfg, "--template")
    assert rc == 0 and not err and "the shipped templates" in out
    for name in ("colocated", "hetjob", "spool_teacher", "spool_student"):
        assert f"\n  {name} " in out
    rc, out, err = run_cli("slurm", "render", "--config", cfg)
    assert rc == 2 and not out and "slurm render needs --template NAME or PATH; the shipped templates" in err


def test_a_bug_prints_its_traceback_and_where_to_report_it(tmp_path, cfg, run_cli, monkeypatch):
    from semalign_ds.run import pipeline

    def broken(cfg):
        raise RuntimeError("an internal invariant broke")
    monkeypatch.setattr(pipeline, "run", broken)  # a bug cannot be caused by input: stand one in
    rc, _, err = run_cli("run", "--config", cfg)
    assert rc == 1 and "Traceback (most recent call last)" in err and "RuntimeError: an internal invariant" in err
    assert "this is a bug in semalign, not in your input: please report it" in err
    assert ownership.read(tmp_path / "run")["status"] == "failed"


def test_os_errors_a_user_fixes_are_one_line(tmp_path, cfg, run_cli, monkeypatch):
    import errno

    from semalign_ds.run import pipeline

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x"))
    monkeypatch.setattr(pipeline, "run", full)
    rc, _, err = run_cli("run", "--config", cfg)
    assert rc == 2 and "the disk is full" in one_error(err) and str(tmp_path / "run" / "x") in err


# ---------------------------------------------------------------- dependencies


def test_versions_outside_the_tested_range_are_a_clear_error(monkeypatch):
    ok = {"deepspeed": "0.19.8", "transformers": "5.24.0", "torch": "2.13.0+cpu", "mlflow": "3.17.2",
          "pydantic": "2.14.4"}
    versions.check(ok)
    with pytest.raises(ValueError, match=r"deepspeed 0.20.1 is outside the tested range deepspeed>=0.19,<0.20; "
                                         r"install 'deepspeed>=0.19,<0.20'; transformers is not installed"):
        versions.check({**ok, "deepspeed": "0.20.1", "transformers": None})
    monkeypatch.setenv(versions.OVERRIDE, "1")
    versions.check({**ok, "deepspeed": "0.16.0"})  # the user's explicit choice: a warning only
    versions.check()  # this environment is within the ranges


def test_pyproject_pins_the_same_ranges():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {re.match(r"[A-Za-z_-]+", d).group(0): d[len(re.match(r"[A-Za-z_-]+", d).group(0)):] for d in deps}
    assert {p: pinned[p] for p in versions.TESTED} == versions.TESTED


def test_shipped_configs_pass_the_ranges():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert cfgmod.load_config_with_problems(path)[1] == [], path
    assert yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())


# ---------------------------------------------------------------- shared machines


def test_a_directory_another_job_holds_is_refused_at_once_by_name(tmp_path, cfg, run_cli):
    from test_ownership import holder_process

    holder = holder_process(tmp_path / "run")  # another job, running, holds the output directory
    try:
        rc, _, err = run_cli("run", "--config", cfg)
        line = one_error(err)
        assert rc == 2 and f"output_dir='{tmp_path}/run' (the run directory) is in use by another semalign job: " \
                           f"pid {holder.pid} on host" in line and "running on this host" in line
        assert sorted(os.listdir(tmp_path / "run")) == [".semalign.lock"]  # nothing written beside the holder's lock
    finally:
        holder.kill()
        holder.wait()


def test_teach_into_a_spool_another_teach_writes_is_refused(tmp_path, cfg, run_cli):
    from test_ownership import holder_process

    holder = holder_process(tmp_path / "spool")
    try:
        rc, _, err = run_cli("teach", "--config", cfg, "--out", tmp_path / "spool")
        assert rc == 2 and f"--out (transport.spool_dir)='{tmp_path}/spool' (the spool being written) is in use by " \
                           f"another semalign job: pid {holder.pid}" in one_error(err)
        rc, _, err = run_cli("train", "--config", cfg, "--from-spool", tmp_path / "spool")
        assert rc == 2 and f"has no manifest.json yet: a job is writing it (pid {holder.pid} on host" in one_error(err)
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_in_sqlite_or_safetensors_words_is_one_line(tmp_path, cfg, run_cli, monkeypatch, tmpfs):
    import sqlite3

    import torch
    from safetensors.torch import save_file

    from semalign_ds.run import pipeline

    full = tmpfs(16)

    def checkpoint(cfg):  # a real SafetensorError from a real full disk
        save_file({"w": torch.zeros(64, 1024)}, str(full / "w.safetensors"))
    monkeypatch.setattr(pipeline, "run", checkpoint)
    rc, _, err = run_cli("run", "--config", cfg)
    assert rc == 2 and "the disk is full" in one_error(err) and "No space left on device" in err

    def metrics(cfg):  # what MLflow raises when its store's disk fills: sqlite's error, wrapped
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as err:
            raise RuntimeError("(sqlite3.OperationalError) could not log") from err
    monkeypatch.setattr(pipeline, "run", metrics)
    rc, _, err = run_cli("run", "--config", cfg)
    assert rc == 2 and "the disk is full" in one_error(err) and "database or disk is full" in err


def test_the_demo_config_check_says_the_demo_fills_its_paths(run_cli):
    rc, _, err = run_cli("config", "--check", "--config", ROOT / "configs" / "demo.yaml")
    assert rc == 2 and "teacher.path is empty" in err
    assert "configs/demo.yaml leaves the paths empty on purpose: `semalign demo` fills teacher.path" in err


def test_check_commands_import_no_ml_stack(tmp_path, cfg):
    """`config --check` and `slurm render` answer in seconds: neither imports torch, transformers, datasets,
    deepspeed or mlflow (which take 5-60 s to import on a busy 2-core login node)."""
    import subprocess
    import sys

    code = ("import sys; from semalign_ds import cli; rc = cli.main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'deepspeed', 'mlflow') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    for args in (["config", "--check", "--config", str(cfg)],
                 ["slurm", "render", "--config", str(cfg), "--template", "colocated"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "HEAVY []" in proc.stdout, (args, proc.stdout[-500:])


def test_no_fixed_rendezvous_port_in_setup_tests_or_the_package():
    """Single-node commands, the setup script and the tests take a free port (or the launcher's): no port number
    is written into them (the Slurm templates derive theirs from the job id, and are not single-node)."""
    pattern = re.compile(r"MASTER_PORT[=:\s\"']+\d{3,5}|master_port[\"', ]+\d{3,5}|WARM_PORT|\b29[5-9]\d\d\b")
    places = [ROOT / "scripts", ROOT / "semalign_ds", ROOT / "tests", ROOT / "configs"]
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for place in places for p in place.rglob("*")
                 if p.is_file() and p.suffix in (".py", ".sh", ".yaml", ".json")
                 for m in pattern.finditer(p.read_text(errors="ignore"))
                 if p.name not in (Path(__file__).name, "test_launch.py")]  # test_launch parses env dicts: binds none
    assert offenders == []


# ---------------------------------------------------------------- DeepSpeed's build locks


def _op_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "ext" / "deepspeed_shm_comm"
    folder.mkdir(parents=True)
    (folder / "build.ninja").write_text("# a build folder\n")
    return folder


def test_a_build_lock_no_process_holds_is_removed_and_a_held_one_kept(tmp_path, caplog):
    import subprocess
    import sys

    from semalign_ds.cluster import extensions

    lock_file = _op_folder(tmp_path) / "lock"
    code = (f"from torch.utils.file_baton import FileBaton; import time; b = FileBaton({str(lock_file)!r}); "
            f"assert b.try_acquire(); print('held', flush=True); time.sleep(120)")  # what torch's builder does
    builder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "held"
        assert extensions.holders(lock_file) == [builder.pid]
        assert extensions.clear_stale_locks(tmp_path / "ext") == [] and lock_file.exists()  # a live build
    finally:
        builder.kill()
        builder.wait()
    assert extensions.clear_stale_locks(tmp_path / "ext") == [lock_file] and not lock_file.exists()
    assert f"removed the stale DeepSpeed build lock {lock_file} (no process holds it)" in caplog.text


def test_a_build_lock_on_a_shared_filesystem_waits_for_activity_to_stop(tmp_path, monkeypatch, caplog):
    from semalign_ds.cluster import extensions

    lock_file = _op_folder(tmp_path) / "lock"
    lock_file.write_text("")
    monkeypatch.setattr(extensions, "_shared", lambda path: True)  # e.g. NFS: a build on another node may hold it
    monkeypatch.setattr(extensions, "POLL_S", 0.05)
    assert extensions.clear_stale_locks(tmp_path / "ext", stale_s=0.3) == [lock_file]
    assert f"waiting for {lock_file}: a DeepSpeed op build on another host, or a stale lock" in caplog.text
    assert f"has been idle" in caplog.text


def test_the_ops_folder_is_the_users_own(tmp_path, monkeypatch, tmpfs):
    import sys

    from semalign_ds.cluster import extensions

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    root = extensions.default_dir("cpu")  # this environment's own folder, or the user's cache: never /root
    assert str(root).startswith((sys.prefix, str(Path.home()))) and root.name.endswith("_cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert extensions.prepare("cpu") == tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmpfs(64, read_only=True) / "ext"))
    with pytest.raises(ValueError, match=r"TORCH_EXTENSIONS_DIR='.*/ext' cannot be written by this user .* unset "
                                         r"it \(semalign then uses the environment's own folder\)"):
        extensions.prepare("cpu")
