"""Where a rank keeps the teacher's packets between the run's one teacher pass and the stages that train on them.

Each rank stores the packets of its own samples (data.owned_samples), rows in arrival order, found by sample id:
- MemoryStore: host tensors (one per packet tensor, the spool's flat names), allocated for the rank's samples on the
  first put.
- DiskStore: a local spool per rank (<store_dir>/rank-00003/) in the spool's shard format (spool.py): shards of
  `shard_rows` rows are committed as they fill, so a rank killed while teaching resumes without recomputing
  committed shards; `finish()` writes the manifest, after which rows are read back (each 8 MiB block's digest
  verified the first time it is read). Removed at the end of the run unless transport.keep_spool. The rank holds
  the folder's job lock (lock.py) while it uses it: two runs given one transport.store_dir cannot mix shards.
A store of either kind: `missing(ids)` (sample ids not stored yet), `put(flat)` (a packet's flat tensors in the
run's codec), `finish()`, `flat(sample_ids_B, layers)` -> those flat tensors with the targets of those student
layers only (the student decodes them on its device), `nbytes`.
Legend: B rows, N samples of the run, R rows this rank stores.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from semalign_ds import lock
from semalign_ds.transport import schema, spool
from semalign_ds.transport.codec import Codec


class _Index:
    """sample id -> row, for the rows stored so far."""

    def __init__(self, num_samples: int, capacity: int):
        self.row_of = torch.full((num_samples,), -1, dtype=torch.int64)
        self.capacity, self.rows = capacity, 0

    def missing(self, sample_ids: torch.Tensor) -> torch.Tensor:
        return sample_ids[self.row_of[sample_ids] < 0]

    def add(self, sample_ids: torch.Tensor) -> int:
        """Rows for these new samples (appended); returns the first."""
        first, n = self.rows, len(sample_ids)
        if first + n > self.capacity:
            raise RuntimeError(f"internal: a packet store of {self.capacity} rows got {first + n}")
        if (self.row_of[sample_ids] >= 0).any():
            raise RuntimeError("internal: a sample was stored twice")
        self.row_of[sample_ids] = torch.arange(first, first + n)
        self.rows += n
        return first

    def rows_of(self, sample_ids: torch.Tensor) -> torch.Tensor:
        rows = self.row_of[sample_ids]
        if (rows < 0).any():
            raise RuntimeError(f"internal: samples {sample_ids[rows < 0].tolist()[:5]} are not in this rank's store")
        return rows


def _new_rows(index: _Index, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """A packet's flat tensors (in its codec) on the CPU, restricted to rows not stored yet (None if none)."""
    flat = {n: t.detach().cpu() for n, t in flat.items()}
    new = index.row_of[flat["sample_ids"]] < 0
    if not new.any():
        return None
    return flat if new.all() else {n: t[new] for n, t in flat.items()}


class MemoryStore:
    kind = "memory"

    def __init__(self, num_samples: int, capacity: int):
        self.index = _Index(num_samples, capacity)
        self.tensors: dict[str, torch.Tensor] | None = None

    def missing(self, sample_ids: torch.Tensor) -> torch.Tensor:
        return self.index.missing(sample_ids)

    @property
    def nbytes(self) -> int:
        return schema.flat_nbytes(self.tensors) if self.tensors else 0

    def put(self, flat: dict[str, torch.Tensor]) -> None:
        """Store a packet's rows (its flat tensors; rows of samples already stored are skipped)."""
        flat = _new_rows(self.index, flat)
        if flat is None:
            return
        if self.tensors is None:
            self.tensors = {n: torch.empty((self.index.capacity, *t.shape[1:]), dtype=t.dtype) for n, t in flat.items()}
        first = self.index.add(flat["sample_ids"])
        for name, t in flat.items():
            self.tensors[name][first:first + t.shape[0]] = t

    def finish(self) -> None:
        pass

    def flat(self, sample_ids_B: torch.Tensor, layers) -> dict[str, torch.Tensor]:
        """The stored flat tensors of these samples, with the targets of student layers `layers` only."""
        rows = self.index.rows_of(sample_ids_B)
        return {n: self.tensors[n][rows] for n in schema.wanted(self.tensors, layers)}

    def remove(self) -> None:
        self.tensors = None

    def close(self) -> None:
        pass


class DiskStore:
    kind = "disk"

    def __init__(self, directory: Path, binding: dict, num_samples: int, capacity: int, shard_rows: int,
                 codec: Codec | None = None):
        self.directory, self.codec = Path(directory), codec or Codec()
        # reentrant: a store this process left locked (an earlier in-process run that failed) is its own
        self.lock = lock.acquire(self.directory, "a rank's packet store", "transport.store_dir", reentrant=True)
        self.plan = spool.open_plan(self.directory, binding, capacity, shard_rows, stages=[])
        self.index = _Index(num_samples, capacity)
        self.shard: spool.ShardFile | None = None
        self.reader: spool.SpoolReader | None = None
        self.binding = binding
        self._reopen()

    def _reopen(self) -> None:
        """Keep the committed shards of an interrupted run (a prefix: shards fill in order); drop the rest."""
        j = 0
        while j < self.plan.num_shards and self.plan.committed(j) is not None:
            first, n = self.plan.rows_of(j)
            with safe_open(str(self.directory / spool.shard_name(j)), framework="pt") as shard:
                ids = shard.get_tensor("sample_ids")
            if self.index.add(ids) != first or len(ids) != n:
                raise RuntimeError(f"internal: shard {j} of {self.directory} is out of order")
            j += 1
        for path in list(self.directory.glob("shard-*")):
            index = int(path.name.split("-")[1].split(".")[0])
            if index >= j:
                path.unlink()

    def missing(self, sample_ids: torch.Tensor) -> torch.Tensor:
        return self.index.missing(sample_ids)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob("shard-*.safetensors"))

    def put(self, flat: dict[str, torch.Tensor]) -> None:
        """Store a packet's rows (rows of samples already stored, e.g. re-sent after a restart, are skipped)."""
        flat = _new_rows(self.index, flat)
        if flat is None:
            return
        row = self.index.add(flat["sample_ids"])
        B = flat["sample_ids"].shape[0]
        while B:
            j, offset = divmod(row, self.plan.shard_rows)
            first, n = self.plan.rows_of(j)
            take = min(B, n - offset)
            part = {name: t[:take] for name, t in flat.items()}
            if self.shard is None:
                layout = [[name, dtype, [n] + shape[1:]] for name, dtype, shape in schema.layout_of(part)]
                self.shard = spool.ShardFile(self.directory, j, layout, self.plan.metadata(j))
            self.shard.write(offset, part)
            if offset + take == n:
                self.shard.commit(first)
                self.shard = None
            flat = {name: t[take:] for name, t in flat.items()}
            row, B = row + take, B - take

    def finish(self) -> None:
        """Every row is stored: write the manifest; reads may start."""
        if self.index.rows != self.index.capacity:
            raise RuntimeError(f"internal: the store in {self.directory} holds {self.index.rows} of "
                               f"{self.index.capacity} rows")
        if self.reader is None:
            spool.write_codec(self.directory, self.codec)
            spool.write_manifest(self.plan, {"local_store": True, "codec": self.codec.describe()})
            self.reader = spool.SpoolReader(self.directory, self.binding)

    def flat(self, sample_ids_B: torch.Tensor, layers) -> dict[str, torch.Tensor]:
        if self.reader is None:
            raise RuntimeError("internal: read from a packet store before finish()")
        rows = self.index.rows_of(sample_ids_B)
        return self.reader.rows(rows, schema.wanted(self.reader.manifest["tensor_names"], layers))

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.abort()
            self.shard = None

    def close(self) -> None:
        """Kept (transport.keep_spool): the folder's lock is released, the shards stay."""
        lock.release(self.lock)

    def remove(self) -> None:
        self.abort()
        lock.release(self.lock)
        shutil.rmtree(self.directory, ignore_errors=True)
