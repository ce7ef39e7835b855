"""The student's top-k KL (objectives.kl_topk, METHOD.md §5) without V-wide temporaries.

objectives.kl_topk selects the real tokens (a copy of the B x T x V logits), divides by tau (another), takes a
log-softmax (a third, saved for backward) and gathers the top-k; its backward allocates several more V-wide
tensors. Only log q at the teacher's top-k ids (N x K) enters the loss, so here a custom autograd function returns
exactly that from the logits and a per-token logsumexp, and its backward recomputes softmax(z / tau) row chunk by
row chunk: the only V-wide tensors are the logits themselves and their gradient. Everything K-wide is the same
arithmetic as objectives.kl_topk (same value, same gradient; tests/test_student_lean.py checks both).
Legend: N tokens (B x T flattened), V vocabulary, K top-k; zs logits, log_q student log-probabilities at the ids.
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**28}  # V-wide temporaries per chunk: 16 MiB (stays in the malloc heap,
# no page faults on reuse) on the CPU, 1 GiB on a GPU (few kernel launches)


def rows_per_chunk(V: int, device) -> int:
    """Rows of an N x V tensor to process at a time so float32 temporaries stay bounded."""
    kind = getattr(device, "type", str(device)).split(":")[0]
    return max(1, CHUNK_ELEMENTS.get(kind, 2**26) // max(1, V))


def _work_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _scaled(z: torch.Tensor, tau: float, dtype: torch.dtype) -> torch.Tensor:
    """z / tau in dtype, without a copy when there is nothing to change."""
    z = z.to(dtype)
    return z if tau == 1.0 else z / tau


class _TopLogProbs(torch.autograd.Function):
    """log softmax(z / tau)[idx] (N x K in `dtype`), saving only z and the per-token logsumexp."""

    @staticmethod
    def forward(ctx, z_NV, idx_NK, tau: float, dtype: torch.dtype, chunk: int):
        lse_N = torch.cat([torch.logsumexp(_scaled(z_NV[i:i + chunk], tau, dtype), dim=-1)
                           for i in range(0, z_NV.shape[0], chunk)])
        ctx.save_for_backward(z_NV, idx_NK, lse_N)
        ctx.tau, ctx.dtype, ctx.chunk = tau, dtype, chunk
        return z_NV.gather(-1, idx_NK).to(dtype) / tau - lse_N.unsqueeze(-1)

    @staticmethod
    def backward(ctx, g_NK):
        z_NV, idx_NK, lse_N = ctx.saved_tensors
        tau, chunk = ctx.tau, ctx.chunk
        g = g_NK.to(ctx.dtype) / tau
        total = g.sum(-1, keepdim=True)
        grad = torch.empty_like(z_NV)
        for i in range(0, z_NV.shape[0], chunk):  # d log q_i / d z_j = (1[j = idx_i] - q_j) / tau
            q = z_NV[i:i + chunk].to(ctx.dtype, copy=True).div_(tau).sub_(lse_N[i:i + chunk].unsqueeze(-1)).exp_()
            q.mul_(-total[i:i + chunk]).scatter_add_(-1, idx_NK[i:i + chunk], g[i:i + chunk])
            grad[i:i + chunk] = q
        return grad, None, None, None, None


def kl_topk_lean(zs_BTV: torch.Tensor, top_values_BTK: torch.Tensor, top_idx_BTK: torch.Tensor,
                 tail_BT: torch.Tensor, mask_BT: torch.Tensor | None = None, tau: float = 1.0,
                 chunk: int | None = None) -> torch.Tensor:
    """objectives.kl_topk(zs_BTV, top_values_BTK, top_idx_BTK, tail_BT, mask_BT, tau), lean in memory."""
    B, T, V = zs_BTV.shape
    K = top_idx_BTK.shape[-1]
    dtype = _work_dtype(zs_BTV, top_values_BTK)
    idx = top_idx_BTK.reshape(B * T, K).to(zs_BTV.device)
    chunk = chunk or rows_per_chunk(V, zs_BTV.device)
    log_q_all = _TopLogProbs.apply(zs_BTV.reshape(B * T, V), idx, float(tau), dtype, chunk)
    keep = (torch.ones(B * T, dtype=torch.bool, device=zs_BTV.device) if mask_BT is None
            else mask_BT.reshape(B * T).to(device=zs_BTV.device, dtype=torch.bool))
    log_q = log_q_all[keep]
    if log_q.shape[0] == 0:
        return log_q_all.sum() * 0.0
    log_q_tail = torch.log((-torch.expm1(torch.logsumexp(log_q, dim=-1).clamp_max(0.0))).clamp_min(1e-30))
    tail = tail_BT.reshape(B * T)[keep.to(tail_BT.device)].to(device=log_q.device, dtype=dtype).clamp(0.0, 1.0)
    values = top_values_BTK.reshape(B * T, K)[keep.to(top_values_BTK.device)].to(device=log_q.device, dtype=dtype)
    log_p = torch.log_softmax(values / tau, dim=-1) + torch.log1p(-tail).unsqueeze(-1)
    p = log_p.exp()
    top_term = (p * (torch.where(p > 0, log_p, torch.zeros_like(log_p)) - log_q)).sum(-1)
    safe_log_tail = torch.log(torch.where(tail > 0, tail, torch.ones_like(tail)))
    per_tok = (top_term + tail * (safe_log_tail - log_q_tail)).clamp_min(0.0)
    return tau ** 2 * per_tok.mean()
