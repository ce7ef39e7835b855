"""Packet codecs: what a packet's tensors look like in a store, a spool or on the wire, and back.

lossless  the schema's flat tensors unchanged (bitwise today's packets).
compact   per trained student layer k, an orthonormal basis U_k (D x r_k) and mean mu_k fitted once on the teacher
          side from a first window of targets (Codec.fit: PCA by a float64 eigendecomposition of the covariance,
          summed over the teacher ranks); a target t becomes r_k coefficients c = U_k^T (t - mu_k), stored as int8
          with a per-token float16 scale (target_bits 8) or as float16 (16); the student decodes
          t ~ mu_k + U_k c on its device. r_k = the smallest rank reaching transport.target_energy of the
          variance, at most transport.target_rank (or exactly target_rank without an energy threshold).
          Top-k logits: values minus the token's top value (softmax is shift-invariant) as uint8 steps of a
          per-token float16 scale (logit_bits 8) or float16 (16); top-k ids and token ids in the fewest bytes the
          vocabulary allows; the tail mass in float16. Cross-tokenizer masks, sample ids and full logits stay.
A codec is described by a JSON-able dict (name, version, bits, ranks, id bytes) plus its basis tensors; both go
into the packets' binding (digest) and with a spool (codec.safetensors + the manifest), so any student decodes a
spool it understands and refuses one it does not, by name.
Legend: B rows, T tokens, D target width, r rank, K top-k.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from semalign_ds.files import json_digest

CODECS = ("lossless", "compact")
VERSION = 1
BASIS_FILE = "codec.safetensors"


assert sys.byteorder == "little", "the packed id layout is little-endian (x86-64, aarch64)"


def pack_ids(ids: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Non-negative ids (any shape S) -> uint8 (S x nbytes): the low bytes of each int64, little-endian (a view and
    one copy, no arithmetic)."""
    return ids.to(torch.int64).contiguous().view(torch.uint8).reshape(*ids.shape, 8)[..., :nbytes].contiguous()


def unpack_ids(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_ids: uint8 (S x nbytes) -> int64 (S)."""
    wide = torch.zeros(*packed.shape[:-1], 8, dtype=torch.uint8, device=packed.device)
    wide[..., :packed.shape[-1]] = packed
    return wide.view(torch.int64).reshape(packed.shape[:-1])


@dataclass
class Codec:
    """A packet codec with its fitted state (the compact codec's bases)."""

    name: str = "lossless"
    target_bits: int = 8
    logit_bits: int = 8
    token_id_bytes: int = 8  # compact: id_bytes(student vocabulary)
    ranks: dict[int, int] = field(default_factory=dict)  # student layer -> rank
    means: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> D (float32)
    bases: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> D x r (float32, orthonormal columns)
    energy: dict[int, float] = field(default_factory=dict)  # layer -> explained share of the variance

    @property
    def lossless(self) -> bool:
        return self.name == "lossless"

    def describe(self) -> dict:
        """What a reader must understand to decode (JSON; in the binding and the manifest)."""
        if self.lossless:
            return {"name": "lossless", "version": VERSION}
        return {"name": self.name, "version": VERSION, "target_bits": self.target_bits,
                "logit_bits": self.logit_bits, "token_id_bytes": self.token_id_bytes,
                "ranks": {str(k): r for k, r in sorted(self.ranks.items())}}

    def digest(self) -> str:
        from semalign_ds.transport.schema import tensor_digest

        tensors = [t for k in sorted(self.bases) for t in (self.means[k], self.bases[k])]
        return json_digest([self.describe(), tensor_digest(*tensors) if tensors else ""])

    def state(self) -> dict[str, torch.Tensor]:
        """The basis tensors by name (saved with a spool)."""
        out = {}
        for k in sorted(self.bases):
            out[f"mean.{k}"], out[f"basis.{k}"] = self.means[k].contiguous(), self.bases[k].contiguous()
        return out

    @classmethod
    def from_state(cls, described: dict, tensors: dict[str, torch.Tensor], where: str) -> "Codec":
        """A codec read back (a spool's manifest + codec.safetensors); ValueError naming what is not understood."""
        name, version = described.get("name"), described.get("version")
        if name not in CODECS or version != VERSION:
            raise ValueError(f"{where} was written with codec {name!r} version {version}; this semalign reads "
                             f"{', '.join(CODECS)} version {VERSION}: upgrade semalign, or rewrite the spool with "
                             f"`semalign teach` and a codec this version knows")
        if name == "lossless":
            return cls()
        bits = (described.get("target_bits"), described.get("logit_bits"))
        if any(b not in (8, 16) for b in bits):
            raise ValueError(f"{where}: codec {name} with target_bits {bits[0]} and logit_bits {bits[1]} is not "
                             f"readable here (8 or 16 bits)")
        ranks = {int(k): int(r) for k, r in described.get("ranks", {}).items()}
        codec = cls(name, bits[0], bits[1], int(described.get("token_id_bytes", 8)), ranks)
        for k, r in ranks.items():
            mean, basis = tensors.get(f"mean.{k}"), tensors.get(f"basis.{k}")
            if mean is None or basis is None or basis.dim() != 2 or basis.shape[1] != r or basis.shape[0] != \
                    mean.shape[0]:
                raise ValueError(f"{where}: codec {name} says layer {k} has rank {r}, but its basis is "
                                 f"{None if basis is None else list(basis.shape)}; the spool is damaged: rewrite it")
            codec.means[k], codec.bases[k] = mean.float(), basis.float()
        return codec

    # ---- encode (teacher side, on its device) ----

    def encode(self, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A packet's flat tensors (schema.packet_to_flat) in this codec."""
        if self.lossless:
            return flat
        out = {}
        for name, t in flat.items():
            if name.startswith("target."):
                out.update(self._encode_target(int(name.split(".")[1]), t))
            elif name in ("ids",):
                out["ids.packed"] = pack_ids(t, self.token_id_bytes)
            elif name == "top_idx":
                out["top_idx.packed"] = pack_ids(t, self.token_id_bytes)
            elif name == "top_values":
                out.update(_encode_values(t, self.logit_bits))
            elif name == "tail":
                out["tail.f16"] = t.to(torch.float16)
            else:
                out[name] = t
        return out

    def _encode_target(self, k: int, t_BTD: torch.Tensor) -> dict[str, torch.Tensor]:
        if k not in self.bases:
            raise RuntimeError(f"internal: the codec has no basis for student layer {k}")
        U, mu = self.bases[k].to(t_BTD.device), self.means[k].to(t_BTD.device)
        c = (t_BTD.float() - mu) @ U  # B x T x r
        if self.target_bits == 16:
            return {f"target.{k}.c16": c.to(torch.float16)}
        scale = c.abs().amax(-1) / 127.0  # per token
        q = torch.round(c / scale.clamp_min(1e-30).unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return {f"target.{k}.q": q, f"target.{k}.scale": scale.to(torch.float16)}

    # ---- decode (student side, on its device) ----

    def decode(self, flat: dict[str, torch.Tensor], target_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The schema's flat tensors back from this codec's (on the tensors' device)."""
        if self.lossless:
            return flat
        out: dict[str, torch.Tensor] = {}
        for name, t in flat.items():
            base, _, part = name.rpartition(".")
            if name.startswith("target.") and part in ("q", "c16"):
                k = int(name.split(".")[1])
                c = t.float() if part == "c16" else t.float() * flat[f"{base}.scale"].float().unsqueeze(-1)
                U, mu = self.bases[k].to(t.device), self.means[k].to(t.device)
                out[f"target.{k}"] = (c @ U.T + mu).to(target_dtype)
            elif name in ("ids.packed", "top_idx.packed"):
                out[name.split(".")[0]] = unpack_ids(t)
            elif name == "top_values.q":
                out["top_values"] = -t.float() * flat["top_values.scale"].float().unsqueeze(-1)
            elif name == "top_values.f16":
                out["top_values"] = t.float()
            elif name == "tail.f16":
                out["tail"] = t.float()
            elif part != "scale":
                out[name] = t
        if "top_idx" in out:
            out["top_idx"] = out["top_idx"].to(torch.int32)
        return out


def _encode_values(v_BTK: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Top-k logits relative to the token's top value (<= 0; softmax is shift-invariant)."""
    rel = v_BTK.float() - v_BTK.float().amax(-1, keepdim=True)
    if bits == 16:
        return {"top_values.f16": rel.to(torch.float16)}
    scale = (-rel.amin(-1)) / 255.0
    q = torch.round(-rel / scale.clamp_min(1e-30).unsqueeze(-1)).clamp_(0, 255).to(torch.uint8)
    return {"top_values.q": q, "top_values.scale": scale.to(torch.float16)}


# ---------------------------------------------------------------- fitting the bases


class BasisFit:
    """Running sums of the targets of each layer over valid positions (float64): count, sum, sum of x x^T."""

    def __init__(self):
        self.n: dict[int, torch.Tensor] = {}
        self.s: dict[int, torch.Tensor] = {}
        self.ss: dict[int, torch.Tensor] = {}

    def add(self, targets: dict[int, torch.Tensor], mask_BT: torch.Tensor) -> None:
        for k, t in targets.items():
            x = t[mask_BT.to(t.device)].to(torch.float64)  # N x D
            if k not in self.n:
                D = t.shape[-1]
                self.n[k] = torch.zeros((), dtype=torch.float64, device=t.device)
                self.s[k] = torch.zeros(D, dtype=torch.float64, device=t.device)
                self.ss[k] = torch.zeros(D, D, dtype=torch.float64, device=t.device)
            self.n[k] += x.shape[0]
            self.s[k] += x.sum(0)
            self.ss[k] += x.T @ x

    def packed(self) -> torch.Tensor:
        """Every sum in one flat float64 tensor (layers in order), for one all-reduce."""
        return torch.cat([torch.cat([self.n[k].reshape(1), self.s[k], self.ss[k].reshape(-1)]) for k in
                          sorted(self.n)])

    def unpack(self, flat: torch.Tensor) -> None:
        at = 0
        for k in sorted(self.n):
            D = self.s[k].numel()
            self.n[k], at = flat[at], at + 1
            self.s[k], at = flat[at:at + D], at + D
            self.ss[k], at = flat[at:at + D * D].reshape(D, D), at + D * D


def fit_bases(fit: BasisFit, rank: int, energy: float | None) -> tuple[dict, dict, dict, dict]:
    """(ranks, means, bases, explained energy) per layer from the sums: the covariance's top eigenvectors."""
    ranks, means, bases, explained = {}, {}, {}, {}
    for k in sorted(fit.n):
        n = float(fit.n[k])
        if n < 2:
            raise ValueError(f"the codec's first window holds {n:.0f} valid positions of student layer {k}; fit it "
                             f"on more tokens (transport.fit_tokens) or use transport.codec=lossless")
        mu = fit.s[k] / n
        cov = fit.ss[k] / n - torch.outer(mu, mu)
        vals, vecs = torch.linalg.eigh(cov)  # ascending
        vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
        share = torch.cumsum(vals, 0) / vals.sum().clamp_min(1e-300)
        r = min(rank, vals.numel())
        if energy is not None:
            r = min(r, int((share < energy).sum()) + 1)
        ranks[k], means[k], bases[k] = r, mu.float().cpu(), vecs[:, :r].float().cpu().contiguous()
        explained[k] = float(share[r - 1])
    return ranks, means, bases, explained


def reconstruction_error(codec: Codec, targets: dict[int, torch.Tensor], mask_BT: torch.Tensor) -> dict[str, float]:
    """Per layer: relative error ||t^ - t|| / ||t|| and mean cosine of the decoded targets, over valid positions
    (the codec's whole path: projection and quantization)."""
    out = {}
    for k, t in targets.items():
        dec = codec.decode(codec.encode({f"target.{k}": t}), torch.float32)[f"target.{k}"]
        m = mask_BT.to(t.device)
        x, y = t[m].float(), dec[m].float()
        out[f"codec/rel_error.{k}"] = float((y - x).norm() / x.norm().clamp_min(1e-30))
        out[f"codec/cosine.{k}"] = float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())
    return out
