"""Transfer data: local JSONL / text / parquet files read through `datasets`, tokenised, packed into
fixed-length blocks, and served as deterministic batches that a resumed run can recompute from the step.

Shapes: N packed sequences, T = seq_len tokens, B batch rows, R data-parallel ranks.
    ids_NT (int64), mask_NT (bool, True = real token), sample_ids_N (int64, 0..N-1)
    Batch: sample_ids_B, ids_BT, mask_BT
Cross-tokenizer blocks (a teacher tokenizer that differs; alignment.py) also carry, per block, the teacher's
reading of the same characters and the position alignment (U teacher positions):
    teacher_ids_NU (int64), teacher_mask_NU (bool), align_NT (int64, teacher position or -1), exact_NT (bool)
and a Batch the same rows of them (None for same-tokenizer runs).
Batching (rank-partitioned, so a rank only ever needs the teacher packets of its own samples): rank r of R
owns the samples i with i % R == r; each epoch is a fresh permutation of them drawn from (seed, epoch, r), cut
into (N // R) // B micro-batches of B. Micro-batch m of a rank maps to epoch m // per_epoch, so
`micro_batch_ids` needs no state and a resumed run recomputes any batch from its index.
"""
from __future__ import annotations

import glob
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from semalign_ds.models.loading import model_max_positions
from semalign_ds.run.budget import micro_batches_per_epoch  # noqa: F401  (data order and budget share it)

if TYPE_CHECKING:  # torch loads in the functions that pack and batch: the file checks of a run need none of it
    import torch

FORMATS = ("auto", "jsonl", "text", "parquet")
_EXTENSIONS = {"jsonl": (".jsonl", ".json"), "text": (".txt", ".text", ".md"), "parquet": (".parquet",)}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
_BUILDERS = {"jsonl": "json", "text": "text", "parquet": "parquet"}
_TOKENIZE_CHUNK = 256  # documents per tokenizer call


class Batch(NamedTuple):
    """One batch of packed blocks: sample_ids_B (int64), ids_BT (int64), mask_BT (bool); cross-tokenizer runs
    also the teacher's ids/mask (B x U) and the alignment (B x T), else None."""

    sample_ids_B: torch.Tensor
    ids_BT: torch.Tensor
    mask_BT: torch.Tensor
    teacher_ids_BU: torch.Tensor | None = None
    teacher_mask_BU: torch.Tensor | None = None
    align_BT: torch.Tensor | None = None
    exact_BT: torch.Tensor | None = None

    def rows(self, index) -> "Batch":
        """The rows `index` (a slice or index tensor) of every field that is present."""
        return Batch(*(None if t is None else t[index] for t in self))


@dataclass(frozen=True)
class TokenBlocks:
    """Packed token blocks: ids_NT (int64), mask_NT (bool), sample_ids_N (int64 arange); with a different teacher
    tokenizer also teacher_ids_NU, teacher_mask_NU, align_NT, exact_NT (alignment.py), else None. Conversation data
    (chat_blocks.py) adds loss_mask_NT (bool: the answer tokens the student's losses cover; None = every real token,
    as for plain text) and `stats` (what the packing kept, truncated, dropped; None for plain text)."""

    ids_NT: torch.Tensor
    mask_NT: torch.Tensor
    sample_ids_N: torch.Tensor
    teacher_ids_NU: torch.Tensor | None = None
    teacher_mask_NU: torch.Tensor | None = None
    align_NT: torch.Tensor | None = None
    exact_NT: torch.Tensor | None = None
    loss_mask_NT: torch.Tensor | None = None
    stats: dict | None = None

    def __len__(self) -> int:
        return int(self.ids_NT.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids_NT.shape[1])

    @property
    def cross(self) -> bool:
        """True when the teacher reads its own tokens (the blocks carry an alignment)."""
        return self.align_NT is not None

    def take(self, index) -> Batch:
        """Rows `index` (a slice or index tensor) as a Batch, every present field included."""
        return Batch(self.sample_ids_N, self.ids_NT, self.mask_NT, self.teacher_ids_NU, self.teacher_mask_NU,
                     self.align_NT, self.exact_NT).rows(index)


# ---------------------------------------------------------------- reading files


def _spec_value(spec, name: str, default):
    """A field of the data spec, which may be a config dataclass or a mapping."""
    value = spec.get(name, default) if isinstance(spec, Mapping) else getattr(spec, name, default)
    return default if value is None else value


def _bare_name(file: Path) -> str:
    """The lower-case file name without a compression suffix."""
    name = file.name.lower()
    for suffix in _COMPRESSION:
        name = name.removesuffix(suffix)
    return name


class Keys(NamedTuple):
    """The config keys a data spec came from, for error messages: `path`, `format` (None: the format is told
    from the file extension, there is no key) and `text_field`."""

    path: str
    format: str | None
    text_field: str

    @classmethod
    def section(cls, name: str = "data") -> "Keys":
        """The keys of a data section (data.path, data.format, data.text_field)."""
        return cls(f"{name}.path", f"{name}.format", f"{name}.text_field")

    def format_fix(self) -> str:
        if self.format is None:
            return "name the file with a .jsonl, .txt or .parquet extension"
        return f"set {self.format} to one of {', '.join(FORMATS[1:])}"


def _keys(key) -> Keys:
    return key if isinstance(key, Keys) else Keys.section(key)


def _format_of(file: Path, keys: Keys) -> str:
    """The format implied by a file's extension (compression suffixes ignored)."""
    for fmt, extensions in _EXTENSIONS.items():
        if _bare_name(file).endswith(extensions):
            return fmt
    raise ValueError(f"{keys.path}: the format of {file} cannot be told from its extension; {keys.format_fix()}")


def resolve_files(path: str, fmt: str, keys: Keys) -> list[Path]:
    """The files named by a file path, a glob, or a directory (its files with the format's extensions)."""
    root = Path(path).expanduser()
    if root.is_file():
        return [root]
    if root.is_dir():
        extensions = sum(_EXTENSIONS.values(), ()) if fmt == "auto" else _EXTENSIONS[fmt]
        files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
                 and _bare_name(p).endswith(extensions)]
        if not files:
            raise ValueError(f"{keys.path}={path!r} is a directory with no {'/'.join(extensions)} files; point "
                             f"{keys.path} at a file, or at a glob such as '{path}/**/*.txt'"
                             + (f" with {keys.format}" if keys.format else ""))
        return sorted(files)
    files = sorted(Path(p) for p in glob.glob(str(root), recursive=True) if Path(p).is_file())
    if not files:
        raise ValueError(f"{keys.path}={path!r} matches no file; set it to an existing file, glob or directory")
    return files


def common_format(files: list[Path], fmt: str, keys: Keys) -> str:
    """The one format of all files; explicit formats win, 'auto' must agree across files."""
    if fmt != "auto":
        return fmt
    formats = {_format_of(f, keys) for f in files}
    if len(formats) > 1:
        raise ValueError(f"{keys.path} mixes formats {sorted(formats)}; use files of one format"
                         + (f" or set {keys.format}" if keys.format else ""))
    return formats.pop()


def _load_rows(builder: str, files: list[Path], cache_dir: str):
    """A `datasets` train split over the files (text files are read one document per file)."""
    import datasets  # heavy; only the readers need it

    options = {"sample_by": "document"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                 cache_dir=cache_dir, **options)


def _load_or_explain(builder: str, files: list[Path], cache_dir: str, keys: Keys):
    """_load_rows, with a parse error turned into a ValueError naming the file that fails."""
    try:
        return _load_rows(builder, files, cache_dir)
    except Exception as err:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, ...)
        culprit = _first_unreadable(builder, files, cache_dir) if len(files) > 1 else files[0]
        cause = err.__cause__ or err
        raise ValueError(f"{keys.path}: cannot read {culprit} as {builder} ({type(cause).__name__}: "
                         f"{str(cause).strip()[:300]}); fix or remove the file"
                         + (f", or set {keys.format}" if keys.format else "")) from err


def _first_unreadable(builder: str, files: list[Path], cache_dir: str) -> Path | str:
    for file in files:
        try:
            _load_rows(builder, [file], cache_dir)
        except Exception:
            return file
    return f"one of {len(files)} files"


def _texts_from_rows(rows, field: str, builder: str, keys: Keys) -> list[str]:
    """The non-empty strings of column `field`; ValueError if the column is absent or not text."""
    field = "text" if builder == "text" else field
    if field not in rows.column_names:
        raise ValueError(f"{keys.text_field}={field!r} is not a column of the data at {keys.path}; available "
                         f"columns: {rows.column_names}. Set {keys.text_field} to one of them")
    texts = rows[field]
    bad = next((i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"{keys.text_field}={field!r}: row {bad} holds {type(texts[bad]).__name__}, not text "
                         f"(the data at {keys.path}); set {keys.text_field} to a string column")
    return [t for t in texts if t]


def data_files(spec, key: str | Keys = "data") -> tuple[list[Path], str]:
    """(the non-empty files of spec.path, their `datasets` builder): the checks that need no parsing."""
    keys = _keys(key)
    path, fmt = _spec_value(spec, "path", ""), _spec_value(spec, "format", "auto")
    if not str(path):
        raise ValueError(f"{keys.path} is empty; set it to a JSONL, text or parquet file, glob or directory")
    if fmt not in FORMATS:
        raise ValueError(f"{keys.format or keys.path + ' format'}={fmt!r} is not one of {', '.join(FORMATS)}")
    files = resolve_files(str(path), fmt, keys)
    builder = _BUILDERS[common_format(files, fmt, keys)]
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise ValueError(f"{keys.path}={str(path)!r}: the data is empty (every file has 0 bytes); add documents")
    return files, builder


def load_texts(spec, key: str | Keys = "data", cache_dir: str | Path | None = None) -> list[str]:
    """Documents from spec.path (file, glob or directory) in spec.format, field spec.text_field.

    `key` names the config keys in errors: a section name ('data': data.path, data.format, data.text_field) or
    `Keys`. `datasets` writes its Arrow cache to `cache_dir`; by default a temporary directory that is removed
    afterwards, so nothing lands in ~/.cache and ranks never share a cache. Empty documents are dropped.
    """
    keys = _keys(key)
    files, builder = data_files(spec, keys)
    with tempfile.TemporaryDirectory(prefix="semalign-datasets-") as scratch:
        rows = _load_or_explain(builder, files, str(cache_dir or scratch), keys)
        texts = _texts_from_rows(rows, _spec_value(spec, "text_field", "text"), builder, keys)
    if not texts:
        raise ValueError(f"{keys.path}={str(_spec_value(spec, 'path', ''))!r}: the data is empty (no non-empty "
                         f"documents); add documents")
    return texts


# ---------------------------------------------------------------- tokenising and packing


def _token_stream(texts: Sequence[str], tokenizer, eos_id: int | None, limit: int | None) -> list[int]:
    """Token ids of the documents in order, EOS after each, stopping once `limit` ids are collected."""
    stream: list[int] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = list(texts[start:start + _TOKENIZE_CHUNK])
        for ids in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            if eos_id is not None:
                stream.append(eos_id)
        if limit is not None and len(stream) >= limit:
            return stream[:limit]
    return stream


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pack_sequences(texts: Sequence[str], tokenizer, seq_len: int, max_sequences: int | None = None,
                   eos: bool = True, key: str = "data", teacher_tokenizer=None, teacher_seq_len: int | None = None,
                   teacher_max_positions: int | None = None) -> TokenBlocks:
    """Tokenise documents (no BOS/special tokens), append EOS to each, and cut the stream into blocks.

    The last block may be partial: padded with the pad id (else EOS, else 0) and mask False there.
    At most `max_sequences` blocks (None = all). Deterministic for fixed inputs.
    With `teacher_tokenizer` (a different tokenizer than the student's) the blocks also carry the teacher's
    reading of each block and the alignment (alignment.py); the student's ids are the same either way.
    """
    if teacher_tokenizer is not None:
        return _pack_cross(texts, tokenizer, seq_len, max_sequences, eos, key, teacher_tokenizer, teacher_seq_len,
                           teacher_max_positions)
    import torch

    _check_pack_args(seq_len, max_sequences, key)
    eos_id = _eos_id(tokenizer, eos)
    limit = None if max_sequences is None else max_sequences * seq_len
    stream = torch.tensor(_token_stream(texts, tokenizer, eos_id, limit), dtype=torch.int64)
    if stream.numel() == 0:
        raise ValueError(f"{key}: the documents produced no tokens; add text")
    return _blocks_from_stream(stream, seq_len, pad_id(tokenizer))


def pack_transfer(spec, tokenizer, teacher_tokenizer=None, teacher_max_positions: int | None = None) -> TokenBlocks:
    """The transfer set of a data config: data.path packed, and with data.replay_fraction f > 0 a share f of the
    sequences packed from data.replay_path, appended after the transfer blocks (the data order shuffles them;
    the teacher supervises both alike). Too little replay data for the share is an error, never a smaller mix."""
    kw = dict(teacher_tokenizer=teacher_tokenizer, teacher_seq_len=_spec_value(spec, "teacher_seq_len", None),
              teacher_max_positions=teacher_max_positions)
    seq_len, n = _spec_value(spec, "seq_len", 512), _spec_value(spec, "max_sequences", None)
    fraction = float(_spec_value(spec, "replay_fraction", 0.0))
    texts = load_texts(spec, "data")
    if fraction == 0:
        return pack_sequences(texts, tokenizer, seq_len, n, **kw)
    main = pack_sequences(texts, tokenizer, seq_len, None if n is None else n - round(fraction * n), **kw)
    want = round(fraction * len(main) / (1 - fraction))
    if want < 1:
        raise ValueError(f"data.replay_fraction={fraction} of {len(main)} transfer sequences is no replay sequence; "
                         f"raise data.replay_fraction or data.max_sequences, or set data.replay_fraction=0")
    keys = Keys("data.replay_path", None, "data.text_field")
    replay_spec = {"path": _spec_value(spec, "replay_path", ""), "format": "auto",
                   "text_field": _spec_value(spec, "text_field", "text")}
    replay = pack_sequences(load_texts(replay_spec, keys), tokenizer, seq_len, want, key="data.replay_path", **kw)
    if len(replay) < want:
        raise ValueError(f"data.replay_path={replay_spec['path']!r} packs into {len(replay)} sequences of "
                         f"{seq_len} tokens; the mix needs {want} (data.replay_fraction={fraction} of the transfer "
                         f"set); add replay documents or lower data.replay_fraction")
    return concat_blocks(main, replay, pad_id(teacher_tokenizer) if teacher_tokenizer is not None else 0)


def concat_blocks(first: TokenBlocks, second: TokenBlocks, teacher_pad: int) -> TokenBlocks:
    """`first`'s blocks then `second`'s, renumbered 0..N-1; teacher rows padded to the longer of the two."""
    import torch

    ids, mask = torch.cat([first.ids_NT, second.ids_NT]), torch.cat([first.mask_NT, second.mask_NT])
    sample_ids = torch.arange(len(ids), dtype=torch.int64)
    if not first.cross:
        return TokenBlocks(ids, mask, sample_ids)
    U = max(first.teacher_ids_NU.shape[1], second.teacher_ids_NU.shape[1])

    def widen(x: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, U - x.shape[1]), value=value)

    return TokenBlocks(ids, mask, sample_ids,
                       torch.cat([widen(first.teacher_ids_NU, teacher_pad), widen(second.teacher_ids_NU, teacher_pad)]),
                       torch.cat([widen(first.teacher_mask_NU, False), widen(second.teacher_mask_NU, False)]),
                       torch.cat([first.align_NT, second.align_NT]), torch.cat([first.exact_NT, second.exact_NT]))


def _check_pack_args(seq_len: int, max_sequences: int | None, key: str) -> None:
    if seq_len < 1:
        raise ValueError(f"{key}.seq_len={seq_len} must be a positive number of tokens")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"{key}.max_sequences={max_sequences} must be positive (or null for all data)")


def _eos_id(tokenizer, eos: bool) -> int | None:
    eos_id = tokenizer.eos_token_id if eos else None
    if eos and eos_id is None:
        raise ValueError("the tokenizer has no EOS token to separate documents; use a tokenizer with one "
                         "or pack with eos=False")
    return eos_id


def _blocks_from_stream(stream: torch.Tensor, seq_len: int, pad_id: int) -> TokenBlocks:
    import torch

    n = -(-stream.numel() // seq_len)
    ids_NT = torch.full((n * seq_len,), pad_id, dtype=torch.int64)
    mask_NT = torch.zeros(n * seq_len, dtype=torch.bool)
    ids_NT[:stream.numel()], mask_NT[:stream.numel()] = stream, True
    return TokenBlocks(ids_NT.view(n, seq_len), mask_NT.view(n, seq_len), torch.arange(n, dtype=torch.int64))


def _pack_cross(texts, tokenizer, seq_len, max_sequences, eos, key, tok_T, teacher_seq_len, teacher_max):
    import torch

    from semalign_ds import alignment

    _check_pack_args(seq_len, max_sequences, key)
    alignment.require_fast(tokenizer, "student.path")
    alignment.require_fast(tok_T, "teacher.path")
    eos_id = _eos_id(tokenizer, eos)
    limit = None if max_sequences is None else max_sequences * seq_len
    stream = alignment.student_stream(list(texts), tokenizer, eos_id, limit)
    if len(stream.ids) == 0:
        raise ValueError(f"{key}: the documents produced no tokens; add text")
    plain = _blocks_from_stream(torch.from_numpy(stream.ids), seq_len, pad_id(tokenizer))
    cross = alignment.teacher_blocks(list(texts), stream, seq_len, tok_T, pad_id(tok_T),
                                     _eos_id(tok_T, eos), teacher_seq_len, teacher_max, key)
    return TokenBlocks(plain.ids_NT, plain.mask_NT, plain.sample_ids_N, cross.teacher_ids_NU, cross.teacher_mask_NU,
                       cross.align_NT, cross.exact_NT)


def check_seq_len(seq_len: int, *configs, key: str = "data.seq_len") -> None:
    """ValueError if seq_len is not positive or exceeds any model's max positions (naming the model)."""
    if seq_len < 1:
        raise ValueError(f"{key}={seq_len} must be a positive number of tokens")
    for config in configs:
        limit = model_max_positions(config)
        if limit is not None and seq_len > limit:
            name = getattr(config, "name_or_path", "") or "(unsaved config)"
            raise ValueError(f"{key}={seq_len} exceeds the {limit} positions of the {config.model_type} model "
                             f"{name}; set {key} to at most {limit}")


# ---------------------------------------------------------------- batching


def owned_samples(num_sequences: int, rank: int, world: int) -> torch.Tensor:
    """The sample ids rank `rank` of `world` trains on: i with i % world == rank (counts differ by at most 1).
    Each rank keeps the teacher packets of its own samples only (memory or a local spool), never another's."""
    import torch

    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    return torch.arange(rank, num_sequences, world, dtype=torch.int64)


def _epoch_order(count: int, seed: int, epoch: int, rank: int) -> torch.Tensor:
    """A permutation of 0..count-1 for (seed, epoch, rank), the same on every platform."""
    import numpy as np
    import torch

    order = np.random.default_rng([seed, epoch, rank]).permutation(count)
    return torch.from_numpy(order).to(torch.int64)


def micro_batch_ids(num_sequences: int, micro_batch: int, world: int, rank: int, seed: int,
                    index: int) -> torch.Tensor:
    """Sample ids of rank `rank`'s micro-batch `index` (0-based, epochs wrap) under `seed`, computed without state.

    Epoch e is a fresh (seed, e, rank) permutation of the rank's own samples, cut into
    micro_batches_per_epoch micro-batches (a rank's few extra samples fall at other positions in other epochs)."""
    if index < 0:
        raise ValueError(f"micro-batch index {index} must be >= 0")
    per_epoch = micro_batches_per_epoch(num_sequences, micro_batch, world)
    epoch, i = divmod(index, per_epoch)
    own = owned_samples(num_sequences, rank, world)
    return own[_epoch_order(len(own), seed, epoch, rank)[i * micro_batch:(i + 1) * micro_batch]]


def window_samples(num_sequences: int, world: int, rank: int, seed: int, count: int) -> list[torch.Tensor]:
    """Rank `rank`'s own samples in `count` windows of nearly equal size (a (seed, rank) permutation, cut in
    order): what a windowed store teaches and trains one after the other."""
    import numpy as np
    import torch

    own = owned_samples(num_sequences, rank, world)
    order = torch.from_numpy(np.random.default_rng([seed, rank, 0, 0, 0]).permutation(len(own))).to(torch.int64)
    return list(torch.tensor_split(own[order], count))


def window_micro_batch_ids(window: torch.Tensor, w: int, micro_batch: int, rank: int, seed: int,
                           index: int) -> torch.Tensor:
    """Micro-batch `index` (0-based, epochs wrap) of window `w` (its sample ids): epoch e is a fresh
    (seed, w, e, rank) permutation of the window, cut into its full micro-batches."""
    import numpy as np
    import torch

    per_epoch = len(window) // micro_batch
    if per_epoch < 1:
        raise ValueError(f"a window of {len(window)} sequences holds no micro-batch of {micro_batch}; raise "
                         f"transport.window_sequences")
    epoch, i = divmod(index, per_epoch)
    order = np.random.default_rng([seed, w, epoch, rank]).permutation(len(window))
    return window[torch.from_numpy(order[i * micro_batch:(i + 1) * micro_batch]).to(torch.int64)]


def take(blocks: TokenBlocks, sample_ids_B: torch.Tensor) -> Batch:
    """The rows of these sample ids, in the given order."""
    return blocks.take(sample_ids_B)
