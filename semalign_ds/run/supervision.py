"""Glue between the run config and the method: vocabulary map, semantic bases and M (cached), packets.

Legend: ids_BT (student ids), M_DsDt (alignment map), S_DV (semantic basis: hidden x vocab).
Different tokenizers: the shared set is the intersection of token strings; the teacher reads the student's
token sequence translated through that map, so every transfer token must be shared (checked up front).
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from semalign_ds import data as datamod
from semalign_ds.cluster.distributed import broadcast_from_first
from semalign_ds.method import basis as basismod
from semalign_ds.models.adapters import get_adapter
from semalign_ds.models.loading import torch_dtype
from semalign_ds.progress import phase
from semalign_ds.transport import schema
from semalign_ds.transport.packet import SupervisionPacket


@dataclass
class VocabMap:
    ids_T: torch.Tensor  # shared teacher ids, index-aligned with ids_S
    ids_S: torch.Tensor
    cross: bool  # the tokenizers differ: the teacher reads its own tokens (TokenBlocks carry them)


def same_tokenizer(tok_T, tok_S) -> bool:
    """The fast path: one vocabulary (same strings, same ids), so the teacher can read the student's ids."""
    return tok_T is tok_S or tok_T.get_vocab() == tok_S.get_vocab()


def vocab_map(cfg, tok_T, tok_S, student, teacher_vocab_size: int) -> VocabMap:
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


def _cache_dir() -> Path:
    return Path(os.environ.get("SEMALIGN_CACHE", Path.home() / ".cache" / "semalign_ds")) / "bases"


@contextmanager
def _file_lock(path: Path):
    """An exclusive lock on `path`.lock (concurrent runs on one machine compute a basis once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def semantic_basis(weight_VD: torch.Tensor, kind: str, random_basis: bool, seed: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """S (D x V, float32 on CPU), cached on disk by a hash of the weights and the kind (under a file lock);
    computed on `device` (the GPU when there is one)."""
    if random_basis:
        gen = torch.Generator().manual_seed(seed)
        S = torch.randn(weight_VD.shape[1], weight_VD.shape[0], generator=gen)
        return S / S.norm(dim=0, keepdim=True)
    path = _cache_dir() / f"{kind}-{basismod.basis_cache_key(weight_VD)}.safetensors"
    with _file_lock(path):
        if path.is_file():
            return load_file(path)["S"]
        w = weight_VD.to(device)
        S = (basismod.output_basis(w) if kind == "output" else basismod.input_basis(w)).cpu()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"S": S.contiguous()}, tmp)
        os.replace(tmp, path)
    return S


def build_map(ctx, table) -> torch.Tensor | None:
    """The alignment map M (D_S x D_T, float32 on the run's device) of method.map, built once per run on the first
    rank of the teacher group and broadcast to the others: pinv M = S_S S_T^T over the shared vocabulary (bases
    cached by weight hash), random (random bases), logit (logit_matching_map of both heads and final-norm gains);
    None for map none (relation_geometry on raw teacher residuals, the hidden_mse baseline's learned projection)."""
    cfg = ctx.cfg
    if cfg.method.map == "none":
        return None
    if cfg.method.map == "logit":
        return _logit_map(ctx)
    kind, main, device = cfg.method.basis, ctx.info.is_main, ctx.info.device
    gather = ctx.teacher.head_weight if kind == "output" else ctx.teacher.input_embedding_weight
    teacher_w = gather(keep=main)  # collective under ZeRO-3: every teacher rank takes part
    adapter = get_adapter(ctx.student)
    M = torch.empty(adapter.hidden_size, ctx.teacher.adapter.hidden_size, dtype=torch.float32, device=device)
    if main:
        random = cfg.method.map == "random"
        student_w = adapter.head_weight() if kind == "output" else adapter.embed.weight
        with phase("semantic bases + alignment map", ctx):
            S_T = semantic_basis(teacher_w, kind, random, cfg.seed + 1, device)
            S_S = semantic_basis(student_w.detach().float().cpu(), kind, random, cfg.seed + 2, device)
            M.copy_(basismod.alignment_map(S_T.to(device), S_S.to(device), ctx.vocab.ids_T, ctx.vocab.ids_S))
    return broadcast_from_first(M, ctx.group)


def _logit_map(ctx) -> torch.Tensor:
    """method.map logit: pinv(W_S diag(g_S)) W_T diag(g_T) over the shared vocabulary (METHOD.md §8), float64 on
    the first rank's device, broadcast in float32. Not cached: cheap once the heads are gathered."""
    main, device = ctx.info.is_main, ctx.info.device
    W_T = ctx.teacher.head_weight(keep=main)  # both gathers are collective under ZeRO-3
    g_T = ctx.teacher.final_norm_gain(keep=main)
    adapter = get_adapter(ctx.student)
    M = torch.empty(adapter.hidden_size, ctx.teacher.adapter.hidden_size, dtype=torch.float32, device=device)
    if main:
        norm_w = getattr(adapter.final_norm, "weight", None)
        g_S = adapter.norm_gain(None if norm_w is None else norm_w.detach().float())
        M.copy_(basismod.logit_matching_map(W_T.to(device), g_T, adapter.head_weight().detach().float().to(device),
                                            g_S, ctx.vocab.ids_T, ctx.vocab.ids_S))
    return broadcast_from_first(M, ctx.group)


def target_kind(cfg) -> str:
    return "state" if cfg.method.layer_objective == "fisher_logits" else "residual"


def binding(ctx, table=None, M_DsDt: torch.Tensor | None = None) -> dict:
    """The hashes that bind packets to this configuration (transport/schema.py); `pairing` and `map` only
    where the pairing table and M are at hand (the teacher side). Only what changes the packets is bound (the
    target kind and normalisation, not the layer objective's name; not the student's training seed), so runs that
    differ in nothing else share one spool."""
    cfg, m = ctx.cfg, ctx.cfg.method
    kind = target_kind(cfg)
    b = {"schema": str(schema.SCHEMA_VERSION),
         "teacher": schema.model_fingerprint(cfg.teacher.path, cfg.teacher.dtype, weights=False),
         "student": schema.model_fingerprint(cfg.student.path, cfg.student.dtype),
         "data": _data_digest(ctx.blocks),
         "method": schema.digest({"top_k": m.top_k, "tau": m.tau, "target_dtype": m.target_dtype, "basis": m.basis,
                                  "map": m.map, "seed": cfg.seed if m.map == "random" else None,
                                  "normalised_targets": normalised_targets(cfg),
                                  "min_shared_tokens": m.min_shared_tokens, "logits": needs_teacher_logits(cfg),
                                  "kind": kind, "targets": needs_teacher_targets(cfg),
                                  "output_objective": m.output_objective}),
         "pairing_config": schema.digest({"pairing": vars(cfg.pairing), "residual": m.residual, "kind": kind})}
    if schema.weight_files(cfg.teacher.path):
        b["teacher_weights"] = schema.model_fingerprint(cfg.teacher.path)
    if table is not None:
        b["pairing"] = schema.digest([table.to_json(), m.residual, kind])
    if M_DsDt is not None:
        b["map"] = schema.tensor_digest(M_DsDt.float())
    return b


def normalised_targets(cfg) -> bool:
    """Targets are M R_T / ||R_T|| per token (METHOD §4), except for the `mse` layer objective: M R_T."""
    return cfg.method.layer_objective != "mse"


def _data_digest(blocks: datamod.TokenBlocks) -> str:
    """The packed student ids and mask; cross-tokenizer blocks add the teacher's tokens and the alignment."""
    if not blocks.cross:
        return schema.tensor_digest(blocks.ids_NT, blocks.mask_NT)
    return schema.tensor_digest(blocks.ids_NT, blocks.mask_NT, blocks.teacher_ids_NU, blocks.teacher_mask_NU,
                                blocks.align_NT, blocks.exact_NT)


def needs_teacher_targets(cfg) -> bool:
    return cfg.method.layer_objective != "none" and cfg.method.w_layer > 0


def needs_teacher_logits(cfg) -> bool:
    return cfg.method.output_objective in ("kl", "uld") and cfg.method.w_out > 0


def emit(ctx, batch: datamod.Batch, recipes: dict, M_DsDt: torch.Tensor) -> SupervisionPacket:
    """One teacher pass -> the packet for this batch (colocated transport: in memory)."""
    cfg, dev = ctx.cfg, ctx.info.device
    if not (needs_teacher_logits(cfg) or needs_teacher_targets(cfg)):  # e.g. SFT: the teacher has nothing to add
        return SupervisionPacket(ids_BT=batch.ids_BT.to(dev), mask_BT=batch.mask_BT.to(dev),
                                 sample_ids_B=batch.sample_ids_B.to(dev))
    recipes = recipes if needs_teacher_targets(cfg) else {}
    ids_T, mask_T = teacher_view(batch)
    shared = ctx.vocab.cross and cfg.method.output_objective == "kl"  # kl across tokenizers: the shared ids
    packet = ctx.teacher.emit(
        ids_T.to(dev), mask_T.to(dev), batch.sample_ids_B, recipes, M_DsDt,
        top_k=cfg.method.top_k, tau=cfg.method.tau, need_logits=needs_teacher_logits(cfg),
        target_dtype=torch_dtype(cfg.method.target_dtype),
        logit_ids_T=ctx.vocab.ids_T if shared else None, logit_ids_S=ctx.vocab.ids_S if shared else None,
        sorted_only=cfg.method.output_objective == "uld", student=student_positions(batch, dev),
        normalise_targets=normalised_targets(cfg),
    )
    packet.ids_BT = batch.ids_BT.to(dev)
    return packet


def packet_bytes_per_sample(cfg, seq_len: int, layers: int, width: int, vocab: int) -> int:
    """Bytes one sample's packet takes in a store or spool (the schema's flat tensors): ids + mask, `layers`
    targets of `width` (D_S; D_T with method.map none), top-k values + ids + tail (or full logits), the sample id."""
    per_token = 8 + 1
    if needs_teacher_targets(cfg):
        per_token += layers * width * (2 if cfg.method.target_dtype == "bfloat16" else 4)
    if needs_teacher_logits(cfg):
        per_token += 8 * cfg.method.top_k + 4 if cfg.method.top_k > 0 else 4 * vocab  # int32 ids on disk
    return seq_len * per_token + 8


def student_positions(batch: datamod.Batch, device):
    """The student's side of a cross-tokenizer batch for the teacher engine (None on the same-tokenizer path)."""
    from semalign_ds.engines.teacher import StudentPositions

    if batch.align_BT is None:
        return None
    return StudentPositions(batch.ids_BT.to(device), batch.mask_BT.to(device), batch.align_BT.to(device),
                            batch.exact_BT.to(device))



def _teacher_hidden(cfg) -> int | None:
    if cfg.method.layer_objective != "hidden_mse":
        return None
    from semalign_ds.models.loading import load_config

    config = load_config(cfg.teacher.path, "teacher.path", cfg.teacher.trust_remote_code)
    return int(config.get_text_config().hidden_size)


def stage_kwargs(ctx, total_steps: int, train_layers: list[int] | None = None) -> dict:
    from semalign_ds.engines.ds_config import load_template, student_ds_config
    from semalign_ds.engines.student import ObjectiveSpec
    from semalign_ds.run import resume

    cfg, s = ctx.cfg, ctx.cfg.schedule
    template = load_template(resume.find_template(cfg.student_engine.ds_config, "student_engine.ds_config"))
    ds = student_ds_config(template, bf16=cfg.student.dtype == "bfloat16", micro_batch=cfg.data.micro_batch_size,
                           grad_accum=s.grad_accum, world_size=ctx.info.world_size, grad_clip=s.grad_clip,
                           hidden_size=get_adapter(ctx.student).hidden_size)
    m = cfg.method
    objective = ObjectiveSpec(layer_objective=m.layer_objective, output_objective=m.output_objective, tau=m.tau,
                              w_layer=m.w_layer, w_out=m.w_out, w_label=m.w_label, target_kind=target_kind(cfg),
                              layer_balance=m.layer_balance, log_grad_cosine=m.log_grad_cosine)
    targets = s.lora_targets or list(get_adapter(ctx.student).family.lora_targets)
    return dict(ds_config=ds, lr=s.lr, warmup_steps=s.warmup_steps, total_steps=total_steps,
                weight_decay=s.weight_decay, adapter_kind=s.adapter, lora_rank=s.lora_rank,
                lora_alpha=s.lora_alpha, lora_targets=targets, objective=objective, train_layers=train_layers,
                teacher_hidden=_teacher_hidden(cfg), mpu=getattr(ctx, "mpu", None))
