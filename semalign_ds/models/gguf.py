"""GGUF checkpoints (llama.cpp's format): accepted where transformers accepts them, converted once to safetensors.

transformers reads a GGUF file (`from_pretrained(dir, gguf_file=name)`, with the `gguf` package installed) and
dequantises it to float; its tokenizer too. The model it returns is marked "quantized", so save_pretrained
refuses it: `convert` builds a plain model from the same config (quantization entry dropped), copies the state
dict into it, and saves that with the tokenizer as a Hugging Face safetensors folder. The ZeRO-3 teacher engine
and the rest of the pipeline load such folders, so a run with `teacher.gguf_file` / `student.gguf_file` uses
`resolve`: the converted folder, made once and cached under $SEMALIGN_CACHE/gguf/<sha256 of the file> (default
~/.cache/semalign_ds), written to a temporary folder and renamed into place under a file lock, so concurrent ranks
or runs convert it once and never read a half-written folder.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import torch

from semalign_ds import files

GGUF_MAGIC = b"GGUF"
_DONE = "semalign_gguf.json"


def cache_root() -> Path:
    return files.cache_root()


def gguf_location(path, gguf_file: str, key: str) -> Path:
    """The GGUF file named by (`path`, `gguf_file`), checked: it exists, is a GGUF file, and `gguf` is installed."""
    file = Path(gguf_file).expanduser()
    if not file.is_absolute():
        file = Path(path or ".").expanduser() / file
    if not file.is_file():
        raise ValueError(f"{key}.gguf_file={gguf_file!r}: {file} is not a file; set {key}.path to the folder that "
                         f"holds it and {key}.gguf_file to its name (or an absolute path)")
    with open(file, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{key}.gguf_file={gguf_file!r}: {file} is not a GGUF file (no GGUF magic); point "
                             f"{key}.gguf_file at a .gguf checkpoint or unset it for a safetensors folder")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError as err:
        raise ValueError(f"{key}.gguf_file needs the `gguf` package to read {file.name}; install it "
                         f"(pip install gguf) or convert the checkpoint to safetensors elsewhere") from err
    return file


def file_sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def load_gguf(file: Path, dtype: torch.dtype, key: str):
    """(model, tokenizer) from a GGUF file: dequantised by transformers, copied into a plain (saveable) model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        quantized = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype,
                                                         local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)
    except (ValueError, KeyError, OSError, NotImplementedError) as err:
        raise ValueError(f"{key}.gguf_file: transformers cannot load {file} ({type(err).__name__}: "
                         f"{str(err).strip()[:300]}); use a GGUF of an architecture transformers reads") from err
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    return model.eval(), tokenizer


def convert(file: Path, out_dir: Path, key: str, dtype: torch.dtype = torch.float32) -> Path:
    """Write the GGUF checkpoint as a safetensors HF folder (config, weights, tokenizer) into `out_dir`."""
    model, tokenizer = load_gguf(file, dtype, key)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _complete(folder: Path, digest: str) -> bool:
    try:
        return json.loads((folder / _DONE).read_text()).get("sha256") == digest
    except (OSError, json.JSONDecodeError):
        return False


def converted_dir(file: Path, key: str, root: Path | None = None) -> Path:
    """The cached safetensors folder of a GGUF file (converted now if absent), keyed by the file's sha256."""
    digest = file_sha256(file)
    root = (root or cache_root()) / "gguf"
    folder = root / digest[:24]
    with files.cache_lock(root / f".{digest[:24]}.lock"):
        if _complete(folder, digest):
            return folder
        shutil.rmtree(folder, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest[:12]}-", dir=root))
        try:
            convert(file, tmp, key)
            (tmp / _DONE).write_text(json.dumps({"sha256": digest, "source": str(file)}))
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve(model_cfg, key: str) -> str:
    """The Hugging Face folder a run loads for `model_cfg` (teacher/student config): `path` itself, or the
    converted folder of its `gguf_file`."""
    if not model_cfg.gguf_file:
        return model_cfg.path
    return str(converted_dir(gguf_location(model_cfg.path, model_cfg.gguf_file, key), key))


def resolved_config(cfg):
    """A copy of the run config whose teacher/student paths are loadable folders (GGUF files converted, cached);
    the rest of the run reads only `path`."""
    import copy

    out = copy.deepcopy(cfg)
    for key in ("teacher", "student"):
        model_cfg = getattr(out, key)
        if model_cfg.gguf_file:
            model_cfg.path, model_cfg.gguf_file = resolve(model_cfg, key), None
    return out
