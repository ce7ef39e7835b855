"""The versioned packet schema: packets as flat tensor dicts, and the hashes that bind packets to a configuration.

A packet travels (stream) or persists (spool) as a flat dict of named tensors, never pickled:
    ids (B x T int64), mask (B x T bool), sample_ids (B int64),
    target.{k} (B x T x D_S, method.target_dtype) for each student layer k it carries,
    top_values (B x T x K float32), top_idx (B x T x K int32 on the wire/disk, int64 in memory; absent for the
    uld objective), tail (B x T float32) or full_logits (B x T x V float32),
    state_mask, out_mask (B x T bool; cross-tokenizer packets only: aligned / exact positions).
Schema 2 (2026-11) added the cross-tokenizer masks and uld packets; schema 1 spools are refused.
Legend: B rows, T tokens, D_S student hidden size, K top-k, V vocabulary.

Binding: a dict of named hex digests saying what produced the packets:
    schema   SCHEMA_VERSION
    teacher  teacher config.json + dtype; teacher_weights its weight files' fingerprint (only where they are:
             a student reading a spool elsewhere may have the teacher's config and tokenizer only)
    student  config.json + weights fingerprint + dtype of the (initial) student
    data     the packed transfer ids and mask                      method   top_k, tau, target dtype, basis, objectives
    pairing_config  the pairing settings + residual + target kind + seed
    pairing  pairing.json content + residual + target kind (computed by the teacher)
    map      the alignment map M (computed by the teacher)
A receiver compares the keys it can compute itself; `check_binding` names every key that differs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from semalign_ds.files import json_digest
from semalign_ds.transport.packet import SupervisionPacket

SCHEMA_VERSION = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64,
          "int32": torch.int32, "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_FINGERPRINT_BYTES = 1 << 20  # of each weight file: its header, size, first and last MiB
_EXPLAINED = {"teacher": "teacher.path / teacher.dtype", "teacher_weights": "the weight files at teacher.path",
              "student": "student.path / student.dtype",
              "data": "data.* (the packed transfer data)", "method": "method.* (top_k, tau, target_dtype, basis, ...)",
              "pairing_config": "pairing.* / method.residual / seed", "pairing": "the pairing table",
              "map": "the alignment map M", "schema": "the packet schema version"}


def digest(obj) -> str:
    """sha256 (first 16 hex) of a JSON-able object in canonical form (files.json_digest)."""
    return json_digest(obj)


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 (first 16 hex) of tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _file_fingerprint(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        f.seek(max(0, size - _FINGERPRINT_BYTES))
        h.update(f.read(_FINGERPRINT_BYTES))


def weight_files(path: str | Path) -> list[Path]:
    root = Path(path)
    return sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin"))


def model_fingerprint(path: str | Path, extra: str = "", weights: bool = True) -> str:
    """A checkpoint folder's identity: its config.json (canonical) and, with `weights`, per weight file its name,
    size and first and last MiB (which hold the safetensors header and weights). Cheap for any model size."""
    root = Path(path)
    h = hashlib.sha256(extra.encode())
    config = root / "config.json"
    if config.is_file():
        h.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    for file in weight_files(root) if weights else []:
        _file_fingerprint(file, h)
    return h.hexdigest()[:16]


def check_binding(expected: dict, got: dict, source: str, fix: str) -> None:
    """ValueError naming each binding key present in both that differs (and what config it comes from)."""
    if str(got.get("schema")) != str(expected.get("schema", SCHEMA_VERSION)):
        raise ValueError(f"{source} uses packet schema {got.get('schema')}, this version reads schema "
                         f"{SCHEMA_VERSION} (it was written by another version of semalign_ds: rerun `semalign "
                         f"teach` with this one); {fix}")
    bad = [k for k in sorted(set(expected) & set(got)) if expected[k] != got[k]]
    if bad:
        detail = "; ".join(f"{k} ({_EXPLAINED.get(k, k)}): {got[k]} != this run's {expected[k]}" for k in bad)
        raise ValueError(f"{source} was produced for a different configuration: {detail}. {fix}")


# ---------------------------------------------------------------- packet <-> flat tensors


def packet_to_flat(packet: SupervisionPacket) -> dict[str, torch.Tensor]:
    """The packet's tensors by schema name, contiguous; top-k ids narrowed to int32."""
    flat = {"ids": packet.ids_BT, "mask": packet.mask_BT.bool(), "sample_ids": packet.sample_ids_B}
    for k, target in sorted(packet.targets.items()):
        flat[f"target.{k}"] = target
    if packet.top_values_BTK is not None:
        flat.update(top_values=packet.top_values_BTK, tail=packet.tail_BT)
    if packet.top_idx_BTK is not None:
        flat["top_idx"] = packet.top_idx_BTK.to(torch.int32)
    if packet.full_logits_BTV is not None:
        flat["full_logits"] = packet.full_logits_BTV
    if packet.state_mask_BT is not None:
        flat.update(state_mask=packet.state_mask_BT.bool(), out_mask=packet.out_mask_BT.bool())
    return {name: t.contiguous() for name, t in flat.items()}


def wanted(names, layers) -> list[str]:
    """The flat names a read of student layers `layers` needs: every non-target tensor, and the targets of those
    layers (`target.{k}`, or a codec's `target.{k}.<part>`)."""
    keep = {str(k) for k in layers}
    return [n for n in names if not n.startswith("target.") or n.split(".")[1] in keep]


def packet_from_flat(flat: dict[str, torch.Tensor]) -> SupervisionPacket:
    """Inverse of packet_to_flat (top-k ids widened back to int64)."""
    missing = [n for n in ("ids", "mask", "sample_ids") if n not in flat]
    if missing:
        raise ValueError(f"a packet lacks the tensors {missing}; it was not written by this schema")
    targets = {int(name.split(".", 1)[1]): t for name, t in flat.items() if name.startswith("target.")}
    idx = flat.get("top_idx")
    return SupervisionPacket(ids_BT=flat["ids"].long(), mask_BT=flat["mask"].bool(),
                             sample_ids_B=flat["sample_ids"].long(), targets=targets,
                             top_values_BTK=flat.get("top_values"), top_idx_BTK=None if idx is None else idx.long(),
                             tail_BT=flat.get("tail"), full_logits_BTV=flat.get("full_logits"),
                             state_mask_BT=_bool_or_none(flat.get("state_mask")),
                             out_mask_BT=_bool_or_none(flat.get("out_mask")))


def _bool_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.bool()


def layout_of(flat: dict[str, torch.Tensor]) -> list[list]:
    """[[name, dtype name, shape], ...] in a fixed (sorted) order: what a receiver allocates."""
    return [[name, DTYPE_NAMES[t.dtype], list(t.shape)] for name, t in sorted(flat.items())]


def alloc_layout(layout: list[list], device) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, dtype=DTYPES[dtype], device=device) for name, dtype, shape in layout}


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as a flat uint8 view (no copy): any dtype travels on any backend."""
    return t.reshape(-1).view(torch.uint8)


def flat_nbytes(flat: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in flat.values())
