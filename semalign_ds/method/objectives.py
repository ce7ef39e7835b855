"""Layer and output objectives (METHOD.md §4-5). Every loss returns a scalar tensor.

Shape legend: rs_BTD student residuals, rt_BTD aligned teacher residuals (both D_S wide),
mask_BT bool (True = real token; None = all real), zs_BTV / zt_BTV student / teacher logits,
top_values_BTK / top_idx_BTK teacher top-k logits and ids, tail_BT teacher tail mass, labels_BT
next-token ids (the caller shifts). Losses compute in float32 (float64 if an input is float64)
whatever the input dtype; padding is excluded exactly by selecting valid tokens, never by zeroing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _mask(mask_BT: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if mask_BT is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask_BT.shape != x.shape[:2]:
        raise ValueError(f"mask shape {tuple(mask_BT.shape)} does not match tensor shape {tuple(x.shape)}")
    return mask_BT.to(device=x.device, dtype=torch.bool)


def _zero(*xs: torch.Tensor) -> torch.Tensor:
    """A zero loss that keeps the graph (no valid tokens)."""
    return sum((x.sum() * 0).to(_dtype(*xs)) for x in xs if x.requires_grad) + torch.zeros(
        (), dtype=_dtype(*xs), device=xs[0].device)


def _masked_mean(values_N: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values_N.mean() if values_N.numel() else _zero(like)


# ---- relation geometry (v2 default) ----

def _centre(X_BTD: torch.Tensor, m_BT1: torch.Tensor, n_B11: torch.Tensor) -> torch.Tensor:
    """Centre over valid tokens (masked mean), then zero the padding (after centring)."""
    mean = (X_BTD * m_BT1).sum(dim=1, keepdim=True) / n_B11.clamp_min(1.0)
    return (X_BTD - mean) * m_BT1


def _geometry_terms(Xs: torch.Tensor, Xt: torch.Tensor, form: str, eps: float):
    """(<G_S,G_T>_F, ||G_S||_F^2, ||G_T||_F^2) per sequence via D x D (``cov``) or T x T (``gram``).

    Products are divided by the sequences' Frobenius norms (the loss is scale invariant), which keeps
    the fourth powers far from float32 overflow without another T x D copy.
    """
    fs = Xs.pow(2).sum(dim=(1, 2)).sqrt().clamp_min(eps)[:, None, None]
    ft = Xt.pow(2).sum(dim=(1, 2)).sqrt().clamp_min(eps)[:, None, None]
    if form == "cov":
        inner = (torch.einsum("btd,bte->bde", Xs, Xt) / (fs * ft)).pow(2).sum(dim=(1, 2))
        ss = (torch.einsum("btd,bte->bde", Xs, Xs) / fs.pow(2)).pow(2).sum(dim=(1, 2))
        tt = (torch.einsum("btd,bte->bde", Xt, Xt) / ft.pow(2)).pow(2).sum(dim=(1, 2))
        return inner, ss, tt
    Gs, Gt = Xs @ Xs.transpose(1, 2) / fs.pow(2), Xt @ Xt.transpose(1, 2) / ft.pow(2)
    return (Gs * Gt).sum(dim=(1, 2)), Gs.pow(2).sum(dim=(1, 2)), Gt.pow(2).sum(dim=(1, 2))


def relation_geometry(rs_BTD: torch.Tensor, rt_BTD: torch.Tensor, mask_BT: torch.Tensor | None = None,
                      eps: float = 1e-12, form: str = "auto") -> torch.Tensor:
    """Mean over sequences of ||G^_S - G^_T||_F^2 = 2 - 2 <G_S, G_T>_F / (||G_S|| ||G_T||).

    G(X) = X_c X_c^T over a sequence's valid tokens. ``form``: ``cov`` never builds T x T (uses
    ||X_S,c^T X_T,c||_F^2), ``gram`` builds T x T, ``auto`` picks the cheaper (cov when T > D).
    Sequences with fewer than 2 valid tokens are left out of the mean.
    """
    if form not in ("auto", "cov", "gram"):
        raise ValueError(f"relation_geometry form must be auto, cov or gram, got {form!r}")
    dtype = _dtype(rs_BTD, rt_BTD)
    mask = _mask(mask_BT, rs_BTD)
    m = mask.to(dtype).unsqueeze(-1)
    n = m.sum(dim=1, keepdim=True)
    Xs = _centre(rs_BTD.to(dtype), m, n)
    Xt = _centre(rt_BTD.to(dtype), m, n)
    if form == "auto":
        form = "cov" if rs_BTD.shape[1] > max(rs_BTD.shape[2], rt_BTD.shape[2]) else "gram"
    inner, ss, tt = _geometry_terms(Xs, Xt, form, eps)
    per_seq = 2.0 - 2.0 * inner / (ss.clamp_min(eps).sqrt() * tt.clamp_min(eps).sqrt())
    keep = n.reshape(-1) >= 2
    return per_seq[keep].mean() if bool(keep.any()) else _zero(rs_BTD, rt_BTD)


def relation_geometry_naive(rs_BTD: torch.Tensor, rt_BTD: torch.Tensor, mask_BT: torch.Tensor | None = None,
                            eps: float = 1e-12) -> torch.Tensor:
    """Test reference: per sequence, select valid tokens, build T x T Grams, normalise, ||G^_S - G^_T||_F^2."""
    dtype = _dtype(rs_BTD, rt_BTD)
    mask = _mask(mask_BT, rs_BTD)
    losses = []
    for b in range(rs_BTD.shape[0]):
        Xs, Xt = rs_BTD[b][mask[b]].to(dtype), rt_BTD[b][mask[b]].to(dtype)
        if Xs.shape[0] < 2:
            continue
        Gs = (Xs - Xs.mean(0)) @ (Xs - Xs.mean(0)).T
        Gt = (Xt - Xt.mean(0)) @ (Xt - Xt.mean(0)).T
        diff = Gs / Gs.norm().clamp_min(eps) - Gt / Gt.norm().clamp_min(eps)
        losses.append(diff.pow(2).sum())
    return torch.stack(losses).mean() if losses else _zero(rs_BTD, rt_BTD)


def cosine_layer(x_BTD: torch.Tensor, target_BTD: torch.Tensor, mask_BT: torch.Tensor | None = None,
                 eps: float = 1e-8) -> torch.Tensor:
    """v1 layer objective: 1 - mean over valid tokens of cos(x, target)."""
    mask = _mask(mask_BT, x_BTD)
    dtype = _dtype(x_BTD, target_BTD)
    cos = F.cosine_similarity(x_BTD[mask].to(dtype), target_BTD[mask].to(dtype), dim=-1, eps=eps)
    return 1.0 - cos.mean() if cos.numel() else _zero(x_BTD)


def mse_layer(x_BTD: torch.Tensor, target_BTD: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """`mse` layer objective: mean over valid tokens of the per-channel mean squared error between the student's
    residual and the mapped teacher residual M R_T, which is NOT normalised per token: with the normalisation both
    sides would be compared as unit vectors, and ||a - b||^2 = 2 - 2 cos(a, b) is the cosine objective again."""
    mask = _mask(mask_BT, x_BTD)
    dtype = _dtype(x_BTD, target_BTD)
    err = (x_BTD[mask].to(dtype) - target_BTD[mask].to(dtype)).pow(2).mean(-1)
    return _masked_mean(err, x_BTD)


# ---- logit objectives ----

def fisher_logits(zs_BTV: torch.Tensor, zt_BTV: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """ACL layer objective: mean over valid tokens of 1/2 d^T (diag(p) - p p^T) d, d = zs - zt,
    p = softmax(zt) detached; the second-order expansion of KL(p || softmax(zt + d))."""
    mask = _mask(mask_BT, zs_BTV)
    dtype = _dtype(zs_BTV, zt_BTV)
    zs, zt = zs_BTV[mask].to(dtype), zt_BTV[mask].to(dtype)
    p = torch.softmax(zt.detach(), dim=-1)
    d = zs - zt
    per_tok = 0.5 * ((p * d.pow(2)).sum(-1) - (p * d).sum(-1).pow(2))
    return _masked_mean(per_tok, zs_BTV)


def kl_full(zs_BTV: torch.Tensor, zt_BTV: torch.Tensor, mask_BT: torch.Tensor | None = None,
            tau: float = 1.0) -> torch.Tensor:
    """tau^2 * mean over valid tokens of KL(softmax(zt/tau) || softmax(zs/tau)); 0 log 0 = 0."""
    mask = _mask(mask_BT, zs_BTV)
    dtype = _dtype(zs_BTV, zt_BTV)
    log_q = torch.log_softmax(zs_BTV[mask].to(dtype) / tau, dim=-1)
    log_p = torch.log_softmax(zt_BTV[mask].to(dtype) / tau, dim=-1)
    p = log_p.exp()
    per_tok = (p * (torch.where(p > 0, log_p, torch.zeros_like(log_p)) - log_q)).sum(-1)
    return tau ** 2 * _masked_mean(per_tok, zs_BTV)


@torch.no_grad()
def teacher_topk(zt_BTV: torch.Tensor, k: int, tau: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values_BTK raw teacher logits, idx_BTK, tail_BT): the k largest logits and the teacher
    probability mass outside them at temperature tau (float32, >= 0). Use the same tau in kl_topk."""
    if not 1 <= k <= zt_BTV.shape[-1]:
        raise ValueError(f"objectives.topk must be in 1..V={zt_BTV.shape[-1]}, got {k}")
    values, idx = zt_BTV.topk(k, dim=-1)
    log_p = torch.log_softmax(zt_BTV.float() / tau, dim=-1)
    lse_top = torch.logsumexp(log_p.gather(-1, idx), dim=-1).clamp_max(0.0)
    tail = (-torch.expm1(lse_top)).clamp_min(0.0)
    return values, idx, tail


def _log_tail(lse_top: torch.Tensor, tiny: float = 1e-30) -> torch.Tensor:
    """log(1 - exp(lse_top)) for lse_top <= 0, floored at log(tiny) (q_tail can round to 0)."""
    return torch.log((-torch.expm1(lse_top.clamp_max(0.0))).clamp_min(tiny))


def kl_topk(zs_BTV: torch.Tensor, top_values_BTK: torch.Tensor, top_idx_BTK: torch.Tensor,
            tail_BT: torch.Tensor, mask_BT: torch.Tensor | None = None, tau: float = 1.0) -> torch.Tensor:
    """tau^2 * mean KL over k+1 buckets (the teacher's top-k tokens and one tail bucket).

    Teacher buckets: p_i = softmax(values/tau)_i (1 - tail), p_tail = tail. Student buckets: q_i =
    softmax(zs/tau) at idx, q_tail = 1 - sum q_i in log space. Equals kl_full when k = V; per-token
    values are clamped at 0 against rounding.
    """
    mask = _mask(mask_BT, zs_BTV)
    dtype = _dtype(zs_BTV, top_values_BTK)
    log_q_all = torch.log_softmax(zs_BTV[mask].to(dtype) / tau, dim=-1)
    log_q = log_q_all.gather(-1, top_idx_BTK[mask].to(log_q_all.device))
    log_q_tail = _log_tail(torch.logsumexp(log_q, dim=-1))
    tail = tail_BT[mask].to(dtype).clamp(0.0, 1.0)
    log_p = torch.log_softmax(top_values_BTK[mask].to(dtype) / tau, dim=-1) + torch.log1p(-tail).unsqueeze(-1)
    p = log_p.exp()
    top_term = (p * (torch.where(p > 0, log_p, torch.zeros_like(log_p)) - log_q)).sum(-1)
    safe_log_tail = torch.log(torch.where(tail > 0, tail, torch.ones_like(tail)))
    tail_term = tail * (safe_log_tail - log_q_tail)
    per_tok = (top_term + tail_term).clamp_min(0.0)
    return tau ** 2 * _masked_mean(per_tok, zs_BTV)


def _label_mask(mask_BT: torch.Tensor | None, labels_BT: torch.Tensor, zs_BTV: torch.Tensor) -> torch.Tensor:
    return _mask(mask_BT, zs_BTV) & (labels_BT.to(zs_BTV.device) >= 0)  # negative labels (-100) are ignored


def label_cosine(zs_BTV: torch.Tensor, labels_BT: torch.Tensor, mask_BT: torch.Tensor | None = None,
                 eps: float = 1e-8) -> torch.Tensor:
    """v1 output objective: 1 - mean over valid tokens of cos(z, onehot(y)) = 1 - z_y / ||z||."""
    mask = _label_mask(mask_BT, labels_BT, zs_BTV)
    z = zs_BTV[mask].to(_dtype(zs_BTV))
    y = labels_BT.to(z.device)[mask]
    cos = z.gather(-1, y.unsqueeze(-1)).squeeze(-1) / z.norm(dim=-1).clamp_min(eps)
    return 1.0 - cos.mean() if cos.numel() else _zero(zs_BTV)


def next_token_valid(mask_BT: torch.Tensor) -> torch.Tensor:
    """mask_B(T-1): positions t whose token and next token are both real (where a next-token loss counts)."""
    return mask_BT[:, :-1] & mask_BT[:, 1:]


def ce(zs_BTV: torch.Tensor, labels_BT: torch.Tensor, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over valid tokens (labels already shifted to be next tokens)."""
    mask = _label_mask(mask_BT, labels_BT, zs_BTV)
    z = zs_BTV[mask].to(_dtype(zs_BTV))
    if z.shape[0] == 0:
        return _zero(zs_BTV)
    return F.cross_entropy(z, labels_BT.to(z.device)[mask])


# ---- cross-tokenizer output objective without shared ids ----

def uld_topk(zs_BTV: torch.Tensor, top_values_BTK: torch.Tensor, tail_BT: torch.Tensor,
             mask_BT: torch.Tensor | None = None, tau: float = 1.0) -> torch.Tensor:
    """Sorted-probability matching (ULD, Boizard et al. 2024; TRL's GOLD uses it across tokenizers): the
    distance between the two next-token distributions with their vocabularies forgotten, i.e. the L1
    distance between the probability vectors sorted in descending order (the closed form of the Wasserstein-1
    distance with a uniform cost when the shorter vector is padded with zeros). Needs no shared token ids.

    The teacher travels as its top-k probabilities (sorted, from `top_values_BTK` at tau, scaled by 1 - tail)
    plus its tail mass: per token  sum_{i<=k} |p_(i) - q_(i)| + |p_tail - q_tail|, q_(i) the student's k
    largest probabilities, q_tail = 1 - their sum. The tail term lower-bounds the distance over the ranks
    beyond k (triangle inequality), so this equals the full sorted L1 when the teacher's top-k holds all its
    mass and never exceeds it. Mean over valid tokens, in [0, 2].
    """
    mask = _mask(mask_BT, zs_BTV)
    dtype = _dtype(zs_BTV, top_values_BTK)
    K = top_values_BTK.shape[-1]
    q = torch.softmax(zs_BTV[mask].to(dtype) / tau, dim=-1)
    if q.shape[-1] < K:
        q = F.pad(q, (0, K - q.shape[-1]))
    q_top = q.topk(K, dim=-1).values
    tail = tail_BT[mask].to(device=q.device, dtype=dtype).clamp(0.0, 1.0)
    p_sorted = torch.softmax(top_values_BTK[mask].to(device=q.device, dtype=dtype) / tau, dim=-1)
    p_sorted = p_sorted.sort(dim=-1, descending=True).values * (1.0 - tail).unsqueeze(-1)
    q_tail = (1.0 - q_top.sum(-1)).clamp_min(0.0)
    per_tok = (p_sorted - q_top).abs().sum(-1) + (tail - q_tail).abs()
    return _masked_mean(per_tok, zs_BTV)
