"""ownership.py: which directories a run may write into (the marker semalign.json), files.py: atomic JSON and
OS errors a user can fix, on real filesystems (a tmpfs mount for a full or read-only disk, where allowed)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from semalign_ds import files
from semalign_ds.run import ownership

H = "0123456789abcdef"


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (hidden ones included): 'nothing was written' means this is equal."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_absent_and_empty_directories_are_free_and_claim_marks_them(tmp_path):
    out = tmp_path / "a" / "b"
    assert ownership.check(out, "run", H) is None
    marker = ownership.claim(out, "run", H)
    assert marker["status"] == "running" and marker["mlflow_run_id"] is None
    assert json.loads((out / ownership.MARKER).read_text()) == marker and os.listdir(out) == [ownership.MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ownership.check(empty, "spool", H) is None


def test_a_rerun_of_the_same_config_keeps_the_mlflow_run_and_creation_time(tmp_path):
    first = ownership.claim(tmp_path / "r", "run", H)
    ownership.note_mlflow_run(tmp_path / "r", "abc123")
    ownership.update(tmp_path / "r", status="killed")
    again = ownership.claim(tmp_path / "r", "run", H)
    assert again["mlflow_run_id"] == "abc123" and again["created"] == first["created"]
    assert again["status"] == "running" and ownership.mlflow_run_id(tmp_path / "r") == "abc123"


@pytest.mark.parametrize("entry", ["config.yaml", ".hidden", ".nfs000123", "lost+found"])
def test_a_directory_with_anything_in_it_and_no_marker_is_refused(tmp_path, entry):
    out = tmp_path / "out"
    out.mkdir()
    (out / entry).mkdir() if entry == "lost+found" else (out / entry).write_text("mine")
    before = tree(out)
    with pytest.raises(ValueError, match=rf"output_dir='{out}' is not empty \({re.escape(entry)}\) and was not "
                                         r"written by semalign \(it has no semalign.json\).*choose another output_dir"):
        ownership.claim(out, "run", H)
    assert tree(out) == before


def test_a_marker_temporary_left_by_a_kill_does_not_make_a_directory_foreign(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".semalign.json.4242.tmp").write_text("{")  # killed between writing the temporary and renaming it
    assert ownership.check(out, "run", H) is None


def test_a_file_another_kind_and_another_config_are_refused(tmp_path):
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(ValueError, match=r"--out \(transport.spool_dir\)='.*/f' is a file, not a directory"):
        ownership.check(file, "spool", H)
    with pytest.raises(ValueError, match=r"is a file, so the directory cannot be created there"):
        ownership.check(file / "sub", "run", H)
    ownership.claim(tmp_path / "run", "run", H)
    with pytest.raises(ValueError, match=r"holds a semalign run \(written by `semalign run` or `semalign train`\), "
                                         r"not a spool"):
        ownership.check(tmp_path / "run", "spool", H)
    with pytest.raises(ValueError, match=r"holds a run of a different configuration \(config hash 0123456789abcdef "
                                         r"!= ffff.*choose another output_dir, or delete that directory"):
        ownership.check(tmp_path / "run", "run", "ffff")
    assert file.read_text() == "x"


@pytest.mark.parametrize("text", ["{", "[]", '{"kind": "bogus", "config_hash": "x"}'])
def test_a_marker_semalign_did_not_write_is_refused(tmp_path, text):
    (tmp_path / ownership.MARKER).write_text(text)
    with pytest.raises(ValueError, match="semalign marker"):
        ownership.check(tmp_path, "run", H)


def test_update_checks_its_fields(tmp_path):
    with pytest.raises(ValueError, match="no semalign.json to update"):
        ownership.update(tmp_path, status="finished")
    ownership.claim(tmp_path / "r", "run", H)
    with pytest.raises(AssertionError):
        ownership.update(tmp_path / "r", status="done")
    assert ownership.update(tmp_path / "r", status="finished")["status"] == "finished"
    ownership.note_mlflow_run(tmp_path / "unmarked", "x")  # a directory nobody claimed: nothing to record
    assert not (tmp_path / "unmarked").exists()


def test_read_only_filesystem_is_refused_before_anything_is_written(tmpfs):
    ro = tmpfs(64, read_only=True)
    with pytest.raises(ValueError, match=rf"output_dir='{ro}/run': {ro} is on a read-only filesystem"):
        ownership.check(ro / "run", "run", H)
    with pytest.raises(ValueError, match="read-only filesystem"):
        ownership.check(ro, "run", H)


def test_write_json_on_a_full_disk_names_the_path_and_bytes_and_leaves_no_temporary(tmpfs):
    full = tmpfs(16)
    big = {"x": "y" * 40_000}
    with pytest.raises(ValueError, match=rf"the disk is full writing 39.1 KiB \(40009 bytes\) to {full}/big.json; "
                                         r".* free there: free space"):
        files.write_json(full / "big.json", big, indent=None)
    assert os.listdir(full) == []
    files.write_json(full / "small.json", {"a": 1})
    assert json.loads((full / "small.json").read_text()) == {"a": 1} and os.listdir(full) == ["small.json"]


def test_check_free_space(tmpfs):
    small = tmpfs(64)
    files.check_free_space(small, 1024, "the spool")
    with pytest.raises(ValueError, match=rf"the spool needs 1.0 MiB \(1048576 bytes\) in {small}/spool but its "
                                         r"filesystem has 64.0 KiB free"):
        files.check_free_space(small / "spool", 1 << 20, "the spool")


def test_user_error_covers_only_what_a_user_fixes():
    import errno

    assert "read-only" in str(files.user_error(OSError(errno.EROFS, "ro", "/x")))
    assert "permission denied" in str(files.user_error(PermissionError(errno.EACCES, "no", "/x")))
    assert files.user_error(OSError(errno.EIO, "io error", "/x")) is None  # hardware: not the user's to fix
    assert files.user_error(RuntimeError("bug")) is None
