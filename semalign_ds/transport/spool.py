"""Spool transport: packets as shards of safetensors plus a JSON manifest, written once by a teacher job and read
by student jobs later, elsewhere, any number of times.

A spool directory:
    shard-00007.safetensors  samples [7 S, 8 S) in sample-id order (S = shard_sequences), the packet tensors of
                             transport/schema.py with B = the shard's rows (all stages' targets: target.{k})
    shard-00007.json         the shard's record (rows, bytes, tokens, the xxh3-128 of each 8 MiB block and the
                             shard's sha256), written after the shard is renamed into place: it commits it
    codec.safetensors        the compact codec's bases (transport/codec.py; the manifest describes the codec)
    manifest.json            written last: schema version, binding hashes, counts, bytes, the shard records
    pairing.json             the pairing table the targets were made with (its hash is in the binding)
Writer: a shard goes to `<name>.tmp`, rows streamed in at their offsets (memory: one micro-batch), fsynced,
renamed, then its record. The safetensors header is ours (sorted keys, one metadata entry), so a shard's bytes are
a pure function of its samples: a writer killed at any point and resumed keeps the committed shards, rewrites
the rest, and ends with the same checksums as an uninterrupted run. A partial (.tmp) shard is never read.
Reader: refuses a missing or incomplete manifest, another schema, another configuration (binding); checks a
shard's size when it opens it and the xxh3 of every 8 MiB block a read touches, the first time (a truncated or
corrupted shard is named). It reads rows by sample id (one pread per run of consecutive rows and tensor, straight
into the batch), so a student draws any batch order from it.
Legend: N samples, T tokens, D_S student hidden size, K top-k; ids_NT etc. as in schema.py.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open

from semalign_ds import files
from semalign_ds.transport import codec as codec_mod, schema
from semalign_ds.transport.codec import Codec
from semalign_ds.transport.packet import SupervisionPacket

MANIFEST = "manifest.json"
PAIRING = "pairing.json"
_ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.int32: "I32",
       torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8"}
_FROM_ST = {v: k for k, v in _ST.items()}
BLOCK = 8 << 20  # readers verify the digest of each block they read, the first time they read it
_REWRITE = ("delete it and its .json record, then rerun `semalign teach` with the same config and --out (it rewrites "
            "only the missing shards)")


def shard_name(j: int) -> str:
    return f"shard-{j:05d}.safetensors"


def _record_path(directory: Path, j: int) -> Path:
    return directory / f"shard-{j:05d}.json"


BLOCK_HASH = "xxh3_128"  # what readers verify: fast (~20 GB/s a core), not cryptographic


def shard_digests(path: Path) -> tuple[str, list[str]]:
    """(the shard's sha256, the xxh3-128 of each BLOCK-byte block), in one read of the file. Readers verify the
    blocks they read (fast); the sha256 is the cryptographic digest a spool that travels between sites is checked
    against (`verify_sha256`)."""
    sha = hashlib.sha256()
    blocks = []
    with open(path, "rb") as f:
        while chunk := f.read(BLOCK):
            sha.update(chunk)
            blocks.append(xxhash.xxh3_128_hexdigest(chunk))
    return sha.hexdigest(), blocks


def _block_digest(data, kind: str) -> str:
    """A block's digest as its record names it: xxh3_128 (this writer), sha256 (spools written before)."""
    return xxhash.xxh3_128_hexdigest(data) if kind == BLOCK_HASH else hashlib.sha256(data).hexdigest()


def verify_sha256(directory) -> list[str]:
    """Every byte of every shard of a spool against its manifest (e.g. after copying it between sites), by sha256:
    the shard's sha256 for this writer's spools, each block's sha256 for spools written before xxh3 blocks. The
    names of the shards that differ, are missing or have the wrong size."""
    manifest = json.loads((Path(directory) / MANIFEST).read_text())
    bad = []
    for record in manifest["shards"]:
        path = Path(directory) / record["file"]
        if not path.is_file() or path.stat().st_size != record["bytes"]:
            bad.append(record["file"])
            continue
        old = record.get("block_hash") != BLOCK_HASH  # its record holds sha256 block digests, no file sha256
        sha, blocks = hashlib.sha256(), []
        with open(path, "rb") as f:
            while chunk := f.read(BLOCK):
                sha.update(chunk)
                if old:
                    blocks.append(hashlib.sha256(chunk).hexdigest())
        if (blocks != record["blocks"]) if old else (sha.hexdigest() != record["sha256"]):
            bad.append(record["file"])
    return bad


def _header(layout: list[list], metadata: dict) -> tuple[bytes, dict[str, int]]:
    """A safetensors header (deterministic bytes) for tensors laid out in `layout` order; name -> data offset."""
    entries, offsets, start = {}, {}, 0
    for name, dtype, shape in layout:
        size = schema.DTYPES[dtype].itemsize * int(torch.Size(shape).numel())
        entries[name] = {"dtype": _ST[schema.DTYPES[dtype]], "shape": shape, "data_offsets": [start, start + size]}
        offsets[name], start = start, start + size
    entries["__metadata__"] = {"semalign": json.dumps(metadata, sort_keys=True)}
    body = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body, offsets


# ---------------------------------------------------------------- writer


class ShardFile:
    """One shard being written: a preallocated temporary file that rows are written into at their offsets."""

    def __init__(self, directory: Path, j: int, layout: list[list], metadata: dict):
        self.directory, self.j, self.layout = directory, j, layout
        self.final = directory / shard_name(j)
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        header, self.offsets = _header(layout, metadata)
        self.base = len(header)
        self.rows = layout[0][2][0]
        self.size = self.base + sum(schema.DTYPES[d].itemsize * int(torch.Size(s).numel()) for _, d, s in layout)
        self.fd = None
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(self.fd, header)
            os.ftruncate(self.fd, self.size)
        except OSError as err:
            self.abort()
            files.reraise(err, self.tmp, self.size)
        self.tokens = 0
        self.binding = metadata["binding"]

    def write(self, row: int, flat: dict[str, torch.Tensor]) -> None:
        """Rows row..row+B-1 of every tensor (flat: the packet's tensors, B leading)."""
        for name, dtype, shape in self.layout:
            t = flat[name]
            if t.dtype != schema.DTYPES[dtype] or list(t.shape[1:]) != shape[1:]:
                raise ValueError(f"spool shard {self.j}: tensor {name} is {t.dtype} {list(t.shape)}, the shard "
                                 f"holds {dtype} rows of {shape[1:]}")
            data = schema.as_bytes(t.detach().contiguous().cpu()).numpy()
            row_bytes = data.nbytes // max(t.shape[0], 1)
            try:
                _pwrite_all(self.fd, memoryview(data).cast("B"), self.base + self.offsets[name] + row * row_bytes)
            except OSError as err:  # a full disk names the shard and the bytes it needs; no half shard stays
                self.abort()
                files.reraise(err, self.tmp, self.size)
        self.tokens += int(flat["mask"].sum())

    def commit(self, first_sample: int) -> dict:
        """fsync, checksum, rename into place, then write the record: the shard is committed."""
        try:
            os.fsync(self.fd)
        except OSError as err:
            self.abort()
            files.reraise(err, self.tmp, self.size)
        os.close(self.fd)
        self.fd = None
        sha, blocks = shard_digests(self.tmp)
        record = {"index": self.j, "file": self.final.name, "first_sample": first_sample, "rows": self.rows,
                  "bytes": self.size, "tokens": self.tokens, "sha256": sha, "block_hash": BLOCK_HASH,
                  "blocks": blocks, "binding": self.binding}
        os.replace(self.tmp, self.final)
        _fsync_dir(self.directory)
        files.write_json(_record_path(self.directory, self.j), record)
        return record

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite until every byte is written: a short write (a disk filling up) is followed by the call that fails."""
    while len(data):
        done = os.pwrite(fd, data, offset)
        if done <= 0:
            raise OSError(errno.ENOSPC, "no progress writing a spool shard")
        data, offset = data[done:], offset + done


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class SpoolPlan:
    """What a (possibly resumed) writer has to do: shard j holds samples [j * rows, (j + 1) * rows)."""

    directory: Path
    binding: dict
    num_samples: int
    shard_rows: int
    stages: list[int]

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_rows)

    def rows_of(self, j: int) -> tuple[int, int]:
        first = j * self.shard_rows
        return first, min(self.shard_rows, self.num_samples - first)

    def metadata(self, j: int) -> dict:
        return {"schema": schema.SCHEMA_VERSION, "binding": schema.digest(self.binding), "shard": j,
                "first_sample": self.rows_of(j)[0], "stages": self.stages}

    def committed(self, j: int) -> dict | None:
        """The shard's record if it is committed and whole, else None (it will be rewritten)."""
        path = _record_path(self.directory, j)
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        if record.get("binding") not in (None, schema.digest(self.binding)):
            raise ValueError(f"spool directory {str(self.directory)!r} holds shards of another configuration "
                             f"({path.name}); write this spool to another --out directory or delete that one")
        shard = self.directory / shard_name(j)
        return record if shard.is_file() and shard.stat().st_size == record["bytes"] else None

    def pending(self) -> list[int]:
        return [j for j in range(self.num_shards) if self.committed(j) is None]


def open_plan(directory, binding: dict, num_samples: int, shard_rows: int, stages: list[int]) -> SpoolPlan:
    """Start or resume a spool in `directory`; ValueError if it holds a spool of another configuration."""
    directory = Path(directory)
    if shard_rows < 1:
        raise ValueError(f"transport.shard_sequences={shard_rows} must be >= 1")
    directory.mkdir(parents=True, exist_ok=True)
    manifest = directory / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        schema.check_binding(binding, old.get("binding", {}), f"the spool in {str(directory)!r}",
                             "write to another --out directory, or delete that spool")
        if old.get("shard_sequences") != shard_rows or old.get("stages") != stages:
            raise ValueError(f"the spool in {str(directory)!r} was written with shard_sequences="
                             f"{old.get('shard_sequences')} and stages {old.get('stages')}; use the same "
                             f"transport.shard_sequences / schedule.stages or another --out directory")
    return SpoolPlan(directory, binding, num_samples, shard_rows, stages)


def write_codec(directory: Path, codec: Codec) -> None:
    """The codec's basis tensors beside the shards (compact; the manifest describes the codec), so a student job
    decodes the spool without the teacher. Deterministic bytes: a resumed writer rewrites the same file."""
    from safetensors.torch import save_file

    state = codec.state()
    if state:
        tmp = files.tmp_name(directory / codec_mod.BASIS_FILE)
        save_file(state, str(tmp), metadata={"codec": json.dumps(codec.describe(), sort_keys=True)})
        os.replace(tmp, directory / codec_mod.BASIS_FILE)


def read_codec(directory: Path, manifest: dict) -> Codec:
    """The codec a spool was written with; ValueError naming a codec, rank or bits this reader cannot decode, or a
    basis file that is missing or not the one the manifest binds."""
    from safetensors.torch import load_file

    described = manifest.get("codec", {"name": "lossless", "version": codec_mod.VERSION})
    path, where = directory / codec_mod.BASIS_FILE, f"the spool in {str(directory)!r}"
    tensors = load_file(str(path)) if path.is_file() else {}
    codec = Codec.from_state(described, tensors, where)
    bound = manifest.get("binding", {}).get("codec")
    if bound is not None and codec.digest() != bound:
        raise ValueError(f"{where}: {codec_mod.BASIS_FILE} is not the codec its packets were written with (changed "
                         f"or damaged); rewrite the spool with `semalign teach`")
    return codec


def space_needed(directory, total_bytes: int) -> int:
    """Bytes a spool of `total_bytes` (supervision.packet_bytes_per_sample x samples) still needs in `directory`:
    less the shards already there."""
    written = sum(p.stat().st_size for p in Path(directory).glob("shard-*.safetensors"))
    return max(0, total_bytes - written)


def write_manifest(plan: SpoolPlan, extra: dict) -> dict:
    """After every shard is committed (all writers done): the manifest that makes the spool readable."""
    records = []
    for j in range(plan.num_shards):
        record = plan.committed(j)
        if record is None:
            raise RuntimeError(f"spool shard {j} of {plan.directory} is not committed; the writer did not finish")
        records.append(record)
    total_bytes, tokens = sum(r["bytes"] for r in records), sum(r["tokens"] for r in records)
    with safe_open(str(plan.directory / shard_name(0)), framework="pt") as first:
        names = sorted(first.keys())
    manifest = {"tensor_names": names, "schema": schema.SCHEMA_VERSION, "complete": True, "binding": plan.binding,
                "binding_digest": schema.digest(plan.binding), "num_samples": plan.num_samples,
                "shard_sequences": plan.shard_rows, "stages": plan.stages, "shards": records,
                "bytes": total_bytes, "tokens": tokens, "bytes_per_token": total_bytes / max(tokens, 1), **extra}
    files.write_json(plan.directory / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------- reader


class SpoolReader:
    """Rows of a complete spool by sample id. A shard's size is checked when it is first opened, and each 8 MiB
    block's digest the first time a read touches it: what a student reads is verified, nothing is read twice
    for it, and the cost follows the bytes read (one stage's targets), not the shard size."""

    def __init__(self, directory, expected_binding: dict):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if self.directory.is_file():
            raise ValueError(f"transport.spool_dir={str(self.directory)!r} is a file, not a spool directory; point "
                             f"--from-spool at the directory `semalign teach --out` wrote")
        if not path.is_file():
            raise ValueError(f"transport.spool_dir={str(self.directory)!r} has no {MANIFEST}: it is not a spool, or "
                             f"the teacher job did not finish; run `semalign teach --config X --out "
                             f"{self.directory}` (it resumes an interrupted spool)")
        self.manifest = json.loads(path.read_text())
        if not self.manifest.get("complete"):
            raise ValueError(f"the spool in {str(self.directory)!r} is incomplete; rerun `semalign teach`")
        schema.check_binding(expected_binding, self.manifest["binding"], f"the spool in {str(self.directory)!r}",
                             "point --from-spool (transport.spool_dir) at a spool written with this config, or "
                             "write one with `semalign teach --config X --out NEW_DIR`")
        self.codec = read_codec(self.directory, self.manifest)
        self.shard_rows = int(self.manifest["shard_sequences"])
        self.stages = list(self.manifest["stages"])
        self.bytes_read = 0
        self._shards: dict[int, _ShardReader] = {}
        self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))

    @property
    def num_samples(self) -> int:
        return int(self.manifest["num_samples"])

    def _shard(self, j: int) -> "_ShardReader":
        if j not in self._shards:
            self._shards[j] = _ShardReader(self.directory, self.manifest["shards"][j], self.manifest["binding_digest"],
                                           j, self._pool)
        return self._shards[j]

    def rows(self, sample_ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        """{name: tensor with one row per sample id, in the given order}; consecutive sample ids of one shard
        are read with one pread per tensor, straight into the result."""
        runs = self._runs(sample_ids.tolist())
        out = {name: None for name in names}
        for dest, (j, row, count) in zip(_starts(runs), runs):
            shard = self._shard(j)
            for name in names:
                if out[name] is None:
                    dtype, shape = shard.spec(name)
                    out[name] = torch.empty((len(sample_ids), *shape[1:]), dtype=dtype)
                self.bytes_read += shard.read_into(name, row, out[name][dest:dest + count])
        return out

    def _runs(self, sample_ids: list[int]) -> list[tuple[int, int, int]]:
        """(shard, first row, rows) of maximal runs of consecutive sample ids within one shard."""
        runs: list[list[int]] = []
        for sid in sample_ids:
            if not 0 <= sid < self.num_samples:
                raise ValueError(f"sample {sid} is not in the spool (0..{self.num_samples - 1})")
            j, row = divmod(int(sid), self.shard_rows)
            if runs and runs[-1][0] == j and runs[-1][1] + runs[-1][2] == row:
                runs[-1][2] += 1
            else:
                runs.append([j, row, 1])
        return [tuple(r) for r in runs]

    def flat(self, sample_ids_B: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor]:
        """The packets of these samples (flat, in the spool's codec) with the targets of student layers `layers`
        (only those are read)."""
        missing = [k for k in layers if k not in self.stages]
        if missing:
            raise ValueError(f"the spool in {str(self.directory)!r} holds targets for student layers {self.stages}, "
                             f"not {missing}; train schedule.stages within them or write a spool for this schedule")
        return self.rows(sample_ids_B, schema.wanted(self.manifest["tensor_names"], layers))

    def packet(self, sample_ids_B: torch.Tensor, layers: list[int]) -> SupervisionPacket:
        """flat(), decoded on the CPU (the spool's targets in the dtype it was written with): for tools and tests;
        a student decodes on its device (run/topology.Feed)."""
        dtype = schema.DTYPES[self.manifest.get("target_dtype", "float32")]
        return schema.packet_from_flat(self.codec.decode(self.flat(sample_ids_B, layers), dtype))


def _starts(runs) -> list[int]:
    out, at = [], 0
    for _, _, count in runs:
        out.append(at)
        at += count
    return out


class _ShardReader:
    """One committed shard: size checked at open, the header parsed, and every block verified against the
    manifest's digest the first time a read touches it (blocks are hashed in parallel)."""

    def __init__(self, directory: Path, record: dict, binding: str, j: int, pool: ThreadPoolExecutor):
        self.path, self.record, self.pool, self.verified = directory / record["file"], record, pool, set()
        self.fd: int | None = None
        if not self.path.is_file():
            raise ValueError(f"spool shard {self.path} is missing; {_REWRITE}")
        size = self.path.stat().st_size
        if size != record["bytes"]:
            raise ValueError(f"spool shard {self.path} is truncated or resized ({size} bytes, the manifest says "
                             f"{record['bytes']}); {_REWRITE}")
        self._verify(0, 8)
        head = int.from_bytes(self._read(0, 8), "little")
        self._verify(0, 8 + head)  # the header lies in blocks the manifest vouches for before it is parsed
        header = json.loads(self._read(8, head))
        meta = json.loads(header.pop("__metadata__", {}).get("semalign", "{}"))
        if meta.get("binding") != binding or meta.get("shard") != j:
            raise ValueError(f"spool shard {self.path} belongs to another spool (binding {meta.get('binding')}, "
                             f"shard {meta.get('shard')}); {_REWRITE}")
        self.base, self.header = 8 + head, header

    def spec(self, name: str) -> tuple[torch.dtype, list[int]]:
        entry = self.header[name]
        return _FROM_ST[entry["dtype"]], entry["shape"]

    def read_into(self, name: str, row: int, out: torch.Tensor) -> int:
        """Rows row..row+len(out)-1 of `name` into the contiguous tensor `out`; returns the bytes read. Blocks the
        range touches for the first time are verified first (read and hashed in parallel; then in page cache)."""
        entry = self.header[name]
        buf = memoryview(schema.as_bytes(out).numpy())
        row_bytes = (entry["data_offsets"][1] - entry["data_offsets"][0]) // max(entry["shape"][0], 1)
        start = self.base + entry["data_offsets"][0] + row * row_bytes
        self._verify(start, start + buf.nbytes)
        got = os.preadv(self._fd(), [buf], start)  # one syscall on the shard's open descriptor
        if got != buf.nbytes:
            raise ValueError(f"spool shard {self.path} ended early reading {name}; {_REWRITE}")
        return got

    def _fd(self) -> int:
        """The shard's read descriptor, opened once (closed when this reader is collected)."""
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY)
            weakref.finalize(self, os.close, self.fd)
        return self.fd

    def _read(self, start: int, n: int) -> bytes:
        return os.pread(self._fd(), n, start)

    def _verify(self, start: int, end: int) -> None:
        todo = [b for b in range(start // BLOCK, -(-end // BLOCK)) if b not in self.verified]
        for b, ok in zip(todo, self.pool.map(self._block_ok, todo)):
            if not ok:
                raise ValueError(f"spool shard {self.path} is corrupted ({self.record.get('block_hash', 'sha256')} "
                                 f"of block {b} differs from the manifest); {_REWRITE}")
            self.verified.add(b)

    def _block_ok(self, b: int) -> bool:
        kind = self.record.get("block_hash", "sha256")
        return _block_digest(self._read(b * BLOCK, BLOCK), kind) == self.record["blocks"][b]
