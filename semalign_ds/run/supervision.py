"""What the teacher emits and how packets are bound: the vocabulary map, the emission, the binding, the codec's fit.

Legend: ids_BT (student ids), M_DsDt (alignment map), S_DV (semantic basis: hidden x vocab).
Different tokenizers: the shared set is the intersection of token strings; the teacher reads the student's
token sequence translated through that map, so every transfer token must be shared (checked up front).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from semalign_ds import data as datamod
from semalign_ds.cluster.distributed import all_reduce_tensor
from semalign_ds.method import basis as basismod
from semalign_ds.models.adapters import get_adapter
from semalign_ds.models.loading import torch_dtype
from semalign_ds.progress import phase
from semalign_ds.spec import id_bytes
from semalign_ds.transport import schema
from semalign_ds.transport.codec import BasisFit, Codec, fit_bases, reconstruction_error
from semalign_ds.transport.packet import SupervisionPacket

if TYPE_CHECKING:
    from semalign_ds.config import RunConfig
    from semalign_ds.run.context import RunContext


@dataclass
class VocabMap:
    ids_T: torch.Tensor  # shared teacher ids, index-aligned with ids_S
    ids_S: torch.Tensor
    cross: bool  # the tokenizers differ: the teacher reads its own tokens (TokenBlocks carry them)

    @classmethod
    def none(cls) -> "VocabMap":
        """A run that needs no teacher output (e.g. SFT) pairs no vocabularies."""
        empty = torch.zeros(0, dtype=torch.int64)
        return cls(empty, empty, False)


def same_tokenizer(tok_T, tok_S) -> bool:
    """The fast path: one vocabulary (same strings, same ids), so the teacher can read the student's ids."""
    return tok_T is tok_S or tok_T.get_vocab() == tok_S.get_vocab()


def vocab_map(cfg: RunConfig, tok_T, tok_S, student, teacher_vocab_size: int) -> VocabMap:
    V_S = get_adapter(student, "student.path").vocab_size
    ids_T, ids_S = basismod.shared_vocabulary(tok_T, tok_S, cfg.method.min_shared_tokens, teacher_vocab_size, V_S)
    limit, what = ((ids_T.numel(), "the shared vocabulary") if cfg.method.output_objective == "kl"
                   else (teacher_vocab_size, "the teacher's vocabulary"))
    if cfg.method.top_k > limit:
        raise ValueError(f"method.top_k={cfg.method.top_k} is larger than {what} ({limit} tokens); lower "
                         f"method.top_k")
    return VocabMap(ids_T, ids_S, not same_tokenizer(tok_T, tok_S))


def teacher_view(batch: datamod.Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) the teacher reads for a batch: its own tokens (cross-tokenizer; trimmed to the batch's longest
    row, as real tokens come first and the model is causal) or the student's."""
    if batch.teacher_ids_BU is not None:
        width = max(int(batch.teacher_mask_BU.sum(1).max()), 1)
        return batch.teacher_ids_BU[:, :width], batch.teacher_mask_BU[:, :width]
    return batch.ids_BT, batch.mask_BT


def binding(ctx: RunContext, table=None, M_DsDt: torch.Tensor | None = None, codec: Codec | None = None) -> dict:
    """The hashes that bind packets to this configuration (transport/schema.py); `pairing` and `map` only
    where the pairing table and M are at hand (the teacher side). Only what changes the packets is bound (the
    target kind and normalisation, not the layer objective's name; not the student's training seed), so runs that
    differ in nothing else share one spool."""
    cfg, m, method = ctx.cfg, ctx.cfg.method, ctx.spec.method
    kind = method.target_kind
    b = {"schema": str(schema.SCHEMA_VERSION),
         "teacher": schema.model_fingerprint(cfg.teacher.path, cfg.teacher.dtype, weights=False),
         "student": schema.model_fingerprint(cfg.student.path, cfg.student.dtype),
         "data": _data_digest(ctx.blocks),
         "method": schema.digest({"top_k": m.top_k, "tau": m.tau, "target_dtype": m.target_dtype, "basis": m.basis,
                                  "map": m.map, "seed": cfg.seed if m.map == "random" else None,
                                  "normalised_targets": method.normalised_targets,
                                  "min_shared_tokens": m.min_shared_tokens, "logits": method.needs_logits,
                                  "kind": kind, "targets": method.needs_targets,
                                  "output_objective": m.output_objective}),
         "pairing_config": schema.digest({"pairing": cfg.pairing.model_dump(), "residual": m.residual,
                                           "kind": kind})}
    if schema.weight_files(cfg.teacher.path):
        b["teacher_weights"] = schema.model_fingerprint(cfg.teacher.path)
    if table is not None:
        b["pairing"] = schema.digest([table.to_json(), m.residual, kind])
    if M_DsDt is not None:
        b["map"] = schema.tensor_digest(M_DsDt.float())
    if codec is not None:
        b["codec"] = codec.digest()
    return b


def _data_digest(blocks: datamod.TokenBlocks) -> str:
    """The packed student ids and mask; cross-tokenizer blocks add the teacher's tokens and the alignment."""
    if not blocks.cross:
        return schema.tensor_digest(blocks.ids_NT, blocks.mask_NT)
    return schema.tensor_digest(blocks.ids_NT, blocks.mask_NT, blocks.teacher_ids_NU, blocks.teacher_mask_NU,
                                blocks.align_NT, blocks.exact_NT)


def emit(ctx: RunContext, batch: datamod.Batch, recipes: dict, M_DsDt: torch.Tensor) -> SupervisionPacket:
    """One teacher pass -> the packet for this batch (colocated transport: in memory)."""
    cfg, dev, method = ctx.cfg, ctx.info.device, ctx.spec.method
    recipes = recipes if method.needs_targets else {}
    ids_T, mask_T = teacher_view(batch)
    shared = ctx.vocab.cross and cfg.method.output_objective == "kl"  # kl across tokenizers: the shared ids
    packet = ctx.teacher.emit(
        ids_T.to(dev), mask_T.to(dev), batch.sample_ids_B, recipes, M_DsDt,
        top_k=cfg.method.top_k, tau=cfg.method.tau, need_logits=method.needs_logits,
        target_dtype=torch_dtype(cfg.method.target_dtype),
        logit_ids_T=ctx.vocab.ids_T if shared else None, logit_ids_S=ctx.vocab.ids_S if shared else None,
        sorted_only=cfg.method.output_objective == "uld", student=student_positions(batch, dev),
        normalise_targets=method.normalised_targets,
    )
    packet.ids_BT = batch.ids_BT.to(dev)
    return packet


def student_positions(batch: datamod.Batch, device):
    """The student's side of a cross-tokenizer batch for the teacher engine (None on the same-tokenizer path)."""
    from semalign_ds.engines.teacher import StudentPositions

    if batch.align_BT is None:
        return None
    return StudentPositions(batch.ids_BT.to(device), batch.mask_BT.to(device), batch.align_BT.to(device),
                            batch.exact_BT.to(device))


# ---------------------------------------------------------------- the packet codec

CODEC_SEED = 104729  # which samples the compact codec's bases are fitted on: a property of the data


def codec_samples(N: int, fit_tokens: int, seq_len: int) -> torch.Tensor:
    """The first window the compact codec is fitted on: ceil(fit_tokens / seq_len) samples of a fixed order of
    the transfer set (the same on any number of ranks)."""
    n = min(N, -(-fit_tokens // seq_len))
    return torch.randperm(N, generator=torch.Generator().manual_seed(CODEC_SEED))[:n].sort().values


def fit_codec(ctx: RunContext, recipes: dict, M_DsDt) -> tuple[Codec, float]:
    """The run's packet codec (transport.codec) and the teacher forwards it cost per transfer sample. compact:
    every teacher rank emits its share of the first window (lockstep micro-batches, spare forwards where a rank
    has fewer), the per-layer sums are all-reduced over the teacher group and every rank fits the same bases (a
    float64 eigendecomposition on the CPU: the same answer on every rank)."""
    t = ctx.cfg.transport
    if t.codec == "lossless" or not ctx.spec.method.needs_teacher:
        return Codec(), 0.0
    info, B, N = ctx.info, ctx.cfg.data.micro_batch_size, len(ctx.blocks)
    window = codec_samples(N, t.fit_tokens, ctx.blocks.seq_len)
    own = window[info.rank::info.world_size]
    per_rank = -(-len(window) // info.world_size)
    rounds = -(-per_rank // B)
    fit = BasisFit()
    with phase("codec bases (first window)", ctx):
        for i in range(rounds):
            ids = own[i * B:(i + 1) * B] if i * B < len(own) else window[:1]
            packet = emit(ctx, datamod.take(ctx.blocks, ids), recipes, M_DsDt)
            if i * B < len(own):
                fit.add(packet.targets, packet.layer_mask_BT)
        if fit.n:
            fit.unpack(all_reduce_tensor(fit.packed(), info.device, ctx.group).cpu())
        ranks, means, bases, energy = fit_bases(fit, t.target_rank, t.target_energy)
    codec = Codec("compact", t.target_bits, t.logit_bits, id_bytes(ctx.spec.student.vocab), ranks, means, bases,
                  energy)
    return codec, rounds * B * info.world_size / N


def codec_error(ctx: RunContext, codec: Codec, recipes: dict, M_DsDt, batch: datamod.Batch) -> dict[str, float]:
    """The codec's target reconstruction error on one batch (relative error and cosine per layer; logged)."""
    if codec.lossless or not ctx.spec.method.needs_targets:
        return {}
    packet = emit(ctx, batch, recipes, M_DsDt)
    errors = reconstruction_error(codec, packet.targets, packet.layer_mask_BT)
    return {**errors, **{f"codec/rank.{k}": float(r) for k, r in codec.ranks.items()},
            **{f"codec/fit_energy.{k}": e for k, e in codec.energy.items()}}
