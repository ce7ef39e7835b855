"""The alignment map M of `method.map` (METHOD.md §1-2, §8), built once per run on the first rank of the teacher
group and broadcast: the semantic bases S (pinv of each LM head, or unit input-embedding rows; cached on disk by a
hash of the weights, computed once under a file lock by concurrent runs on one machine) folded into
M = S_S S_T^T over the shared vocabulary; the logit-matching map; random bases; or none.
Legend: M_DsDt (student hidden x teacher hidden), S_DV (semantic basis: hidden x vocab).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from semalign_ds import files
from semalign_ds.cluster.distributed import broadcast_from_first
from semalign_ds.method import basis as basismod
from semalign_ds.models.adapters import get_adapter
from semalign_ds.progress import phase

if TYPE_CHECKING:
    from semalign_ds.run.context import RunContext


def _cache_dir() -> Path:
    return files.cache_root("bases")


def semantic_basis(weight_VD: torch.Tensor, kind: str, random_basis: bool, seed: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """S (D x V, float32 on CPU), cached on disk by a hash of the weights and the kind (under a file lock);
    computed on `device` (the GPU when there is one)."""
    if random_basis:
        gen = torch.Generator().manual_seed(seed)
        S = torch.randn(weight_VD.shape[1], weight_VD.shape[0], generator=gen)
        return S / S.norm(dim=0, keepdim=True)
    path = _cache_dir() / f"{kind}-{basismod.basis_cache_key(weight_VD)}.safetensors"
    with files.cache_lock(path.with_name(path.name + ".lock")):  # concurrent runs on one machine: computed once
        if path.is_file():
            return load_file(path)["S"]
        w = weight_VD.to(device)
        S = (basismod.output_basis(w) if kind == "output" else basismod.input_basis(w)).cpu()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"S": S.contiguous()}, tmp)
        os.replace(tmp, path)
    return S


def build_map(ctx: RunContext, table) -> torch.Tensor | None:
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


def _logit_map(ctx: RunContext) -> torch.Tensor:
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
