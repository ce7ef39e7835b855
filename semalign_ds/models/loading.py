"""Load teacher and student checkpoints by local path, with clear errors before any weight is read.

A checkpoint is a Hugging Face directory: config.json, safetensors weights, and (for tokenizers) the
tokenizer files. Every check names the config key the path came from (e.g. 'teacher.path') and the fix:
    missing path / not a directory / no config.json / unreadable config.json
    -> not a causal LM (architectures without a *ForCausalLM / *LMHeadModel class)
    -> family not in ADAPTERS (lists the supported ones)
    -> weights that are not safetensors (.bin, .pt, .h5, ... are refused: no pickle)
A folder with GGUF files but no config.json is refused with the hint to set `<model>.gguf_file` (models/gguf.py
converts GGUF checkpoints to such folders). Nothing here touches the Hugging Face hub (local_files_only=True).
Device and dtype are explicit.
No tensors are created here beyond the model's own parameters.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from semalign_ds.models.adapters import ADAPTERS, family_of

if TYPE_CHECKING:  # torch and transformers load inside the loaders: the checks before a run read JSON only
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_UNSAFE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack")
_CONVERT_HINT = (
    "Convert it once with `AutoModelForCausalLM.from_pretrained(old).save_pretrained(new)` "
    "(transformers >= 5 writes safetensors; older versions need safe_serialization=True) and point {key} at new"
)


def _checkpoint_dir(path, key: str) -> Path:
    """The checkpoint directory, or ValueError if it is missing or not a directory."""
    if path is None or str(path) == "":
        raise ValueError(f"{key} is empty; set it to a local Hugging Face checkpoint directory")
    directory = Path(path).expanduser()
    if not directory.exists():
        raise ValueError(f"{key}={str(path)!r} does not exist; set it to a local Hugging Face checkpoint "
                         "directory (the hub is not used: download the model beforehand)")
    if not directory.is_dir():
        raise ValueError(f"{key}={str(path)!r} is a file; set it to the checkpoint directory that holds "
                         "config.json and the *.safetensors weights")
    return directory


def _raw_config(directory: Path, key: str) -> dict:
    """config.json as a dict, or ValueError if it is absent or not valid JSON."""
    config_file = directory / "config.json"
    if not config_file.is_file():
        ggufs = sorted(p.name for p in directory.glob("*.gguf"))
        if ggufs:
            raise ValueError(f"{key}={str(directory)!r} has no config.json but holds GGUF files ({', '.join(ggufs)}); "
                             f"set {key.rsplit('.', 1)[0]}.gguf_file to one of them (converted once to safetensors)")
        raise ValueError(f"{key}={str(directory)!r} has no config.json; it is not a Hugging Face model "
                         "directory (save the model with save_pretrained into it)")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{key}: cannot read {config_file}: {err}; re-save the model with save_pretrained") from err


def _check_causal_lm(raw: dict, directory: Path, key: str) -> None:
    """ValueError if config.json names architectures and none of them is a causal LM."""
    architectures = raw.get("architectures") or []
    if architectures and not any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures):
        raise ValueError(
            f"{key}={str(directory)!r} is not a causal LM (architectures: {architectures}); SemAlign needs a "
            f"decoder with an LM head (*ForCausalLM). Point {key} at a causal LM checkpoint of one of: "
            f"{', '.join(sorted(ADAPTERS))}"
        )


def _check_family(raw: dict, directory: Path, key: str) -> None:
    """ValueError if the model_type has no adapter."""
    model_type = raw.get("model_type")
    if model_type not in ADAPTERS:
        raise ValueError(
            f"{key}={str(directory)!r}: model family {model_type!r} is not supported; supported families: "
            f"{', '.join(sorted(ADAPTERS))}. Use a checkpoint of a supported family or add an adapter in "
            "semalign_ds/models/adapters.py"
        )


def _check_safetensors(directory: Path, key: str) -> None:
    """ValueError unless the directory holds safetensors weights."""
    if any(directory.glob("*.safetensors")):
        return
    unsafe = sorted(p.name for pattern in _UNSAFE_WEIGHTS for p in directory.glob(pattern))
    if unsafe:
        raise ValueError(f"{key}={str(directory)!r} holds weights that are not safetensors ({', '.join(unsafe)}); "
                         "they are refused because loading them runs pickle. " + _CONVERT_HINT.format(key=key))
    raise ValueError(f"{key}={str(directory)!r} has no *.safetensors weights; save the model with "
                     "save_pretrained into it")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config dtype name ('float32', 'bfloat16', 'float16')."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def check_weights(path, key: str, gguf_file: str | None = None) -> None:
    """ValueError unless the checkpoint's weights are safetensors (or the named GGUF file exists: the config's
    gguf_file field; how a GGUF file is read is the loader's business)."""
    directory = _checkpoint_dir(path, key)
    if gguf_file:
        if not (directory / gguf_file).is_file() and not Path(gguf_file).is_file():
            raise ValueError(f"{key}: the GGUF file {gguf_file!r} is neither in {str(directory)!r} nor a file path; "
                             "set gguf_file to the .gguf file's name in the checkpoint directory")
        return
    _check_safetensors(directory, key)


def check_model(path, key: str, weights: bool = True, gguf_file: str | None = None) -> None:
    """Every check that reads no weights: the directory, config.json, a causal LM of a supported family, and
    (weights=True) safetensors weights. For the check pass before a run."""
    _checked_dir(path, key)
    if weights:
        check_weights(path, key, gguf_file)


def check_tokenizer_files(path, key: str) -> None:
    """ValueError unless the directory holds tokenizer files (without loading them)."""
    directory = _checkpoint_dir(path, key)
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"{key}={str(directory)!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save "
                         "one there with tokenizer.save_pretrained")


def _checked_dir(path, key: str) -> Path:
    """All checks that need only config.json; returns the checkpoint directory."""
    directory = _checkpoint_dir(path, key)
    raw = _raw_config(directory, key)
    _check_causal_lm(raw, directory, key)
    _check_family(raw, directory, key)
    return directory


# attribute names of transformers' configs that some families spell differently in config.json (transformers maps
# them through each config class's attribute_map; the check pass reads the JSON without transformers)
_ALIASES = {"num_hidden_layers": ("n_layer",), "hidden_size": ("n_embd",), "max_position_embeddings": ("n_positions",)}


class JsonConfig:
    """config.json as attributes, for the checks before a run (no torch or transformers import): the keys of the
    file, a few aliases (gpt2's n_layer, n_embd, n_positions), `get_text_config()` (a nested text_config, else
    itself) and `name_or_path`. A key the file leaves to the config class's default is absent (AttributeError)."""

    def __init__(self, raw: dict, name_or_path: str):
        self._raw, self.name_or_path = raw, name_or_path

    def __getattr__(self, name: str):
        raw = self.__dict__.get("_raw", {})
        for candidate in (name, *_ALIASES.get(name, ())):
            if candidate in raw:
                return raw[candidate]
        raise AttributeError(name)

    def get_text_config(self) -> "JsonConfig":
        text = self._raw.get("text_config")
        return JsonConfig(text, self.name_or_path) if isinstance(text, dict) else self


def json_config(path, key: str = "model.path") -> JsonConfig:
    """The checkpoint's config.json after the path/causal-LM/family checks, without transformers."""
    directory = _checked_dir(path, key)
    return JsonConfig(_raw_config(directory, key), str(directory))


def load_config(path, key: str = "model.path", trust_remote_code: bool = False) -> PretrainedConfig:
    """The checkpoint's config (no weights read), after the path/causal-LM/family checks.

    Used for planning and by the teacher engine, which materialises the weights under ZeRO-3 itself.
    """
    from transformers import AutoConfig

    directory = _checked_dir(path, key)
    return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, local_files_only=True)


def load_causal_lm(path, dtype: torch.dtype, device: str | torch.device, trust_remote_code: bool = False,
                   key: str = "model.path") -> PreTrainedModel:
    """A causal LM from a local safetensors checkpoint, cast to `dtype`, on `device`, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"load_causal_lm({key}): dtype must be a torch.dtype, got {dtype!r}")
    directory = _checked_dir(path, key)
    _check_safetensors(directory, key)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, trust_remote_code=trust_remote_code, local_files_only=True, use_safetensors=True,
    )
    return model.to(torch.device(device)).eval()


def load_tokenizer(path, key: str = "model.path", trust_remote_code: bool = False):
    """The checkpoint's tokenizer (AutoTokenizer, local files only).

    If the tokenizer has no pad token but has an EOS token, the pad token is set to EOS: padded
    positions are always masked out (mask_BT False), so the pad id's value never reaches a loss.
    """
    from transformers import AutoTokenizer

    directory = _checkpoint_dir(path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code,
                                                  local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{key}={str(directory)!r} has no usable tokenizer ({type(err).__name__}: "
                         f"{str(err).strip()[:200]}); save one there with tokenizer.save_pretrained") from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_max_positions(config: PretrainedConfig, key: str = "model") -> int | None:
    """Longest sequence the model was built for (the adapter's max_positions_attr), None if unset."""
    attr = family_of(config, key).max_positions_attr
    value = getattr(config.get_text_config(), attr, None)
    return int(value) if value is not None else None
