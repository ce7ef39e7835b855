"""Semantic bases, the shared vocabulary and the folded alignment map (METHOD.md §1-2).

Shape legend: W_VD is an LM head (V x D), E_VD an input-embedding table, S_DV a semantic basis
(D x V, unit columns), ids_T / ids_S index-aligned LongTensors of shared token ids (length V'),
M the alignment map (D_S x D_T), x_BTD teacher vectors, returned aligned vectors x~_BTD (D_S wide).

The alignment decomposes a teacher vector into cosine coefficients over the teacher basis and
recomposes them over the student basis: a = S_T^T x / ||x||, x~ = S_S a. Being linear in x/||x||,
it folds into M = S_S S_T^T, so the hot path never materialises the B x T x V coefficients.
"""
from __future__ import annotations

import hashlib

import torch

from semalign_ds.method.surface import surfaces

_HASH_FULL_LIMIT = 1 << 22  # elements hashed in full; above this a strided subsample is hashed


def _unit_columns(S_DV: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return S_DV / S_DV.norm(dim=0, keepdim=True).clamp_min(eps)


def output_basis(W_VD: torch.Tensor, dtype: torch.dtype = torch.float32, chunk: int = 16384) -> torch.Tensor:
    """Output-side basis: unit-normalised columns of pinv(W) (D x V), returned in ``dtype``.

    Computed on W's device in float64 through the D x D Gram matrix, pinv(W) = (W^T W)^+ W^T: V D^2 + D^3 work
    instead of an SVD of the V x D head (seconds for a 128k x 8k head on a GPU). Float64 because the Gram matrix
    squares W's condition number; eigenvalues below (max(V, D) * eps_float32 * sigma_max)^2 are cut, as pinv's
    default cutoff does for float32 weights. Both passes over the vocabulary go by `chunk` rows, so beyond the
    D x V result only chunk x D float64 blocks are held (a 262k-row head needs no float64 copy of itself)."""
    if W_VD.dim() != 2:
        raise ValueError(f"output_basis expects a 2-D LM head weight (V x D), got shape {tuple(W_VD.shape)}")
    W = W_VD.detach()
    V, D = W.shape
    gram = torch.zeros(D, D, dtype=torch.float64, device=W.device)
    for start in range(0, V, chunk):
        rows = W[start:start + chunk].to(torch.float64)
        gram.addmm_(rows.T, rows)
    evals, evecs = torch.linalg.eigh(gram)
    cutoff = (max(V, D) * torch.finfo(torch.float32).eps) ** 2 * evals.max().clamp_min(0)
    inv = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
    gram_pinv = (evecs * inv) @ evecs.T
    S_DV = torch.empty(D, V, dtype=dtype, device=W.device)
    for start in range(0, V, chunk):
        S_DV[:, start:start + chunk] = _unit_columns(gram_pinv @ W[start:start + chunk].to(torch.float64).T).to(dtype)
    return S_DV


def input_basis(E_VD: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Input-side basis (ablation `basis: input`): unit-normalised embedding rows, transposed (D x V)."""
    if E_VD.dim() != 2:
        raise ValueError(f"input_basis expects a 2-D embedding table (V x D), got shape {tuple(E_VD.shape)}")
    return _unit_columns(E_VD.detach().to(dtype).T.contiguous())


def _vocab(tok) -> dict[str, int]:
    vocab = tok.get_vocab()
    if not isinstance(vocab, dict):
        raise ValueError(f"tokenizer {type(tok).__name__}.get_vocab() must return dict[str, int]")
    return vocab


def _id_limit(V: int | None) -> float:
    return float("inf") if V is None else V


def shared_vocabulary(tok_T, tok_S, min_shared: int, V_T: int | None = None,
                      V_S: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index-aligned shared token ids (ids_T, ids_S), both int64 of the same length.

    Same tokenizer object or identical vocabularies: every id, in order. Otherwise the tokens that spell
    the same bytes (method/surface.py: 'Ġthe' of a byte-level BPE and '▁the' of a SentencePiece-style one
    are both b' the'; special tokens are not matched), plus the two EOS tokens (both end a document), sorted
    by teacher id. Ids at or beyond a model's head size (``V_T``/``V_S`` rows) are not shared; head rows
    beyond the tokenizer vocabulary are never shared. Fewer than ``min_shared`` shared tokens raise ValueError.
    """
    vocab_T = _vocab(tok_T)
    vocab_S = vocab_T if tok_S is tok_T else _vocab(tok_S)
    lim_T, lim_S = _id_limit(V_T), _id_limit(V_S)
    if vocab_S is vocab_T or vocab_S == vocab_T:
        ids = sorted(i for i in set(vocab_T.values()) if i < lim_T and i < lim_S)
        pairs = [(i, i) for i in ids]
    else:
        surf_T, surf_S = surfaces(tok_T), surfaces(tok_S)
        pairs = [(i, surf_S[b]) for b, i in surf_T.items() if b in surf_S]
        eos_T, eos_S = getattr(tok_T, "eos_token_id", None), getattr(tok_S, "eos_token_id", None)
        if eos_T is not None and eos_S is not None:
            pairs.append((eos_T, eos_S))
        pairs = sorted((i, j) for i, j in set(pairs) if i < lim_T and j < lim_S)
    if len(pairs) < min_shared:
        raise ValueError(
            f"teacher and student share {len(pairs)} tokens (teacher vocab {len(vocab_T)}, student vocab "
            f"{len(vocab_S)}), fewer than method.min_shared_tokens={min_shared}; use models whose "
            f"tokenizers overlap more or lower method.min_shared_tokens")
    ids_T = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    ids_S = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return ids_T, ids_S


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def alignment_map(S_T_DV: torch.Tensor, S_S_DV: torch.Tensor, ids_T: torch.Tensor, ids_S: torch.Tensor,
                  chunk: int = 8192) -> torch.Tensor:
    """M = S_S[:, ids_S] @ S_T[:, ids_T]^T (D_S x D_T), float32 (float64 if an input is), chunked over V."""
    if ids_T.shape != ids_S.shape or ids_T.dim() != 1:
        raise ValueError(f"ids_T {tuple(ids_T.shape)} and ids_S {tuple(ids_S.shape)} must be equal-length 1-D")
    dtype = _work_dtype(S_T_DV, S_S_DV)
    device = S_T_DV.device
    M = torch.zeros(S_S_DV.shape[0], S_T_DV.shape[0], dtype=dtype, device=device)
    for start in range(0, ids_T.numel(), chunk):
        jt = ids_T[start:start + chunk].to(S_T_DV.device)
        js = ids_S[start:start + chunk].to(S_S_DV.device)
        part_S = S_S_DV.index_select(1, js).to(device=device, dtype=dtype)
        part_T = S_T_DV.index_select(1, jt).to(device=device, dtype=dtype)
        M.addmm_(part_S, part_T.T)
    return M


def align(M: torch.Tensor, x_BTD: torch.Tensor, eps: float = 1e-6,
          out_dtype: torch.dtype | None = None, normalise: bool = True) -> torch.Tensor:
    """x~ = M x / ||x|| per token (M x with normalise=False: the `mse` layer objective), computed in M's dtype,
    returned in ``out_dtype`` (default x's dtype).

    A zero vector (e.g. padding) maps to zero: its norm is clamped to ``eps``.
    """
    x = x_BTD.to(M.dtype)
    y = x @ M.T
    if normalise:
        y = y / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    return y.to(out_dtype or x_BTD.dtype)


def _scaled_rows(W_VD: torch.Tensor, ids: torch.Tensor, g_D: torch.Tensor | None) -> torch.Tensor:
    rows = W_VD.index_select(0, ids.to(W_VD.device)).to(torch.float64)
    return rows if g_D is None else rows * g_D.to(device=rows.device, dtype=torch.float64)


def logit_matching_map(W_T_VD: torch.Tensor, g_T_D: torch.Tensor | None, W_S_VD: torch.Tensor,
                       g_S_D: torch.Tensor | None, ids_T: torch.Tensor, ids_S: torch.Tensor,
                       chunk: int = 8192) -> torch.Tensor:
    """M_logit = pinv(A) B with A = W_S[ids_S] diag(g_S) (V' x D_S), B = W_T[ids_T] diag(g_T) (V' x D_T)
    (METHOD.md §8): D_S x D_T, float64 on W_T's device.

    A teacher state h is read by the head as B h (up to the final norm's scale, which the objectives' per-token
    normalisation and the norm itself remove); M h is the student state whose head reading A M h is closest to it
    in least squares over the shared vocabulary. g = the final norm's gains (None = 1, a norm without weight).
    Computed like output_basis: the D_S x D_S Gram matrix A^T A and A^T B accumulated over vocabulary chunks in
    float64 (the Gram squares A's condition number), then pinv(A) B = (A^T A)^+ A^T B with pinv's cutoff.
    """
    if ids_T.shape != ids_S.shape or ids_T.dim() != 1:
        raise ValueError(f"ids_T {tuple(ids_T.shape)} and ids_S {tuple(ids_S.shape)} must be equal-length 1-D")
    for name, W, g in (("W_T", W_T_VD, g_T_D), ("W_S", W_S_VD, g_S_D)):
        if W.dim() != 2 or (g is not None and g.shape != (W.shape[1],)):
            raise ValueError(f"{name} must be V x D with a gain of length D, got {tuple(W.shape)} and "
                             f"{None if g is None else tuple(g.shape)}")
    device = W_T_VD.device
    D_S, D_T = W_S_VD.shape[1], W_T_VD.shape[1]
    gram = torch.zeros(D_S, D_S, dtype=torch.float64, device=device)
    cross = torch.zeros(D_S, D_T, dtype=torch.float64, device=device)
    for start in range(0, ids_T.numel(), chunk):
        A = _scaled_rows(W_S_VD, ids_S[start:start + chunk], g_S_D).to(device)
        B = _scaled_rows(W_T_VD, ids_T[start:start + chunk], g_T_D).to(device)
        gram.addmm_(A.T, A)
        cross.addmm_(A.T, B)
    evals, evecs = torch.linalg.eigh(gram)
    cutoff = (max(ids_S.numel(), D_S) * torch.finfo(torch.float32).eps) ** 2 * evals.max().clamp_min(0)
    inv = torch.where(evals > cutoff, 1.0 / evals, torch.zeros_like(evals))
    return (evecs * inv) @ (evecs.T @ cross)


def naive_align(x_BTD: torch.Tensor, S_T_DV: torch.Tensor, S_S_DV: torch.Tensor, ids_T: torch.Tensor,
                ids_S: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Test reference: explicit V-wide coefficients a = S_T^T x / ||x||, then x~ = S_S a."""
    dtype = _work_dtype(S_T_DV, S_S_DV, x_BTD)
    x = x_BTD.to(dtype)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
    coeff_BTV = x @ S_T_DV.to(dtype)[:, ids_T]
    return coeff_BTV @ S_S_DV.to(dtype)[:, ids_S].T


def basis_cache_key(W: torch.Tensor, full_limit: int = _HASH_FULL_LIMIT) -> str:
    """Hex sha256 identifying a weight by value (dtype-independent: hashed as float32 on CPU).

    Weights up to ``full_limit`` elements are hashed in full. Larger ones hash their shape plus a
    strided subsample of about ``full_limit`` elements and the first and last rows, so hashing a
    128k x 8k head is fast; two weights that differ only at unsampled positions share a key (a
    fine-tune changes far more than that, but delete the cache if you edit single weights by hand).
    """
    h = hashlib.sha256(f"shape={tuple(W.shape)}".encode())
    flat = W.detach().reshape(-1)
    if flat.numel() > full_limit:
        step = -(-flat.numel() // full_limit)
        parts = [flat[::step], W.detach()[0].reshape(-1), W.detach()[-1].reshape(-1)]
        h.update(f"step={step}".encode())
    else:
        parts = [flat]
    for part in parts:
        h.update(part.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
