"""Evaluation helpers for plain Hugging Face causal LMs (no DeepSpeed).

Batches are pairs ``(ids_BT, mask_BT)``: int64 token ids and a bool mask (True = real token).
Padding may sit on either side: positions are recomputed from the mask, so a padded sequence
scores exactly like the same sequence unpadded.

Shape legend: B batch, T tokens, V vocabulary. ``logits_BTV`` holds the prediction for the
token that follows position t.

- ``perplexity``: exp of the mean next-token cross-entropy over pairs (t, t+1) where both tokens
  are real.
- ``teacher_agreement``: KL(teacher || student) and top-1 match rate, averaged over real tokens;
  the teacher's logits come from a callable so they can be produced by any engine.
- ``format_table``: a markdown table for summaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from semalign_ds.method.objectives import next_token_valid

Batch = tuple[torch.Tensor, torch.Tensor]


def _check_batch(ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> None:
    if ids_BT.dim() != 2 or ids_BT.shape != mask_BT.shape:
        raise ValueError(
            f"batches must yield (ids_BT, mask_BT) of equal 2-D shape; got {tuple(ids_BT.shape)} "
            f"and {tuple(mask_BT.shape)}"
        )


def position_ids_from_mask(mask_BT: torch.Tensor) -> torch.Tensor:
    """Positions 0.. counted over real tokens only, so left padding does not shift them."""
    return (mask_BT.long().cumsum(-1) - 1).clamp(min=0)


def model_logits(model: torch.nn.Module, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Forward a causal LM on one batch; returns float32 ``logits_BTV``."""
    out = model(
        input_ids=ids_BT,
        attention_mask=mask_BT.long(),
        position_ids=position_ids_from_mask(mask_BT),
        use_cache=False,
    )
    return out.logits.float()


def _to_device(ids_BT: torch.Tensor, mask_BT: torch.Tensor, device: torch.device | str) -> Batch:
    _check_batch(ids_BT, mask_BT)
    return ids_BT.to(device=device, dtype=torch.long), mask_BT.to(device=device, dtype=torch.bool)


def next_token_loss_sum(logits_BTV: torch.Tensor, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token cross-entropy over pairs where both tokens are real, and their count."""
    valid_BT = next_token_valid(mask_BT)
    if not bool(valid_BT.any()):
        return 0.0, 0
    ce_BT = F.cross_entropy(
        logits_BTV[:, :-1].transpose(1, 2), ids_BT[:, 1:], reduction="none"
    )
    return float(ce_BT[valid_BT].double().sum()), int(valid_BT.sum())


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device | str) -> float:
    """exp(mean next-token cross-entropy) of ``model`` over ``batches`` (token-weighted)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for ids_BT, mask_BT in batches:
            ids_BT, mask_BT = _to_device(ids_BT, mask_BT, device)
            loss_sum, n = next_token_loss_sum(model_logits(model, ids_BT, mask_BT), ids_BT, mask_BT)
            total, count = total + loss_sum, count + n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: the batches hold no pair of consecutive real tokens")
    return math.exp(total / count)


def _agreement_sums(zs_BTV: torch.Tensor, zt_BTV: torch.Tensor, mask_BT: torch.Tensor) -> tuple[float, float, int]:
    if zs_BTV.shape != zt_BTV.shape:
        raise ValueError(
            f"teacher logits {tuple(zt_BTV.shape)} and student logits {tuple(zs_BTV.shape)} differ; "
            "teacher and student must share the vocabulary (same tokenizer, same vocab_size)"
        )
    zs_NV, zt_NV = zs_BTV[mask_BT], zt_BTV[mask_BT]
    log_ps_NV, log_pt_NV = F.log_softmax(zs_NV, -1), F.log_softmax(zt_NV, -1)
    kl_N = (log_pt_NV.exp() * (log_pt_NV - log_ps_NV)).sum(-1)
    top1_N = zs_NV.argmax(-1) == zt_NV.argmax(-1)
    return float(kl_N.double().sum()), float(top1_N.sum()), int(mask_BT.sum())


@torch.no_grad()
def teacher_agreement(
    student: torch.nn.Module,
    teacher_logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[Batch],
    device: torch.device | str,
) -> dict[str, float]:
    """Mean KL(teacher || student) and top-1 agreement over real tokens.

    ``teacher_logits_fn(ids_BT, mask_BT) -> logits_BTV`` receives the batch already on ``device``;
    its result is moved to ``device`` and cast to float32.
    """
    was_training = student.training
    student.eval()
    kl_sum, top1_sum, count = 0.0, 0.0, 0
    try:
        for ids_BT, mask_BT in batches:
            ids_BT, mask_BT = _to_device(ids_BT, mask_BT, device)
            zt_BTV = teacher_logits_fn(ids_BT, mask_BT).to(device=device, dtype=torch.float32)
            zs_BTV = model_logits(student, ids_BT, mask_BT)
            k, t, n = _agreement_sums(zs_BTV, zt_BTV, mask_BT)
            kl_sum, top1_sum, count = kl_sum + k, top1_sum + t, count + n
    finally:
        student.train(was_training)
    if count == 0:
        raise ValueError("teacher_agreement: the batches hold no real token")
    return {"kl": kl_sum / count, "top1": top1_sum / count}


def _cell(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.1f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _is_numeric(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_table(rows: Sequence[dict], columns: Sequence[str | tuple[str, str]]) -> str:
    """A markdown table of ``rows``; ``columns`` are keys or (key, header) pairs.

    Missing values print empty; floats print with 4 significant digits (one decimal from 1000
    up); a column whose values are all numbers is right-aligned.
    """
    if not columns:
        raise ValueError("format_table: columns is empty; name at least one key")
    keys = [c if isinstance(c, str) else c[0] for c in columns]
    headers = [c if isinstance(c, str) else c[1] for c in columns]
    cells = [[_cell(row.get(k)) for k in keys] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(_is_numeric(r.get(k)) or r.get(k) is None for r in rows) for k in keys]

    def line(parts: list[str]) -> str:
        padded = [p.rjust(w) if num else p.ljust(w) for p, w, num in zip(parts, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in cells])


# ---------------------------------------------------------------- the end-of-run evaluation


def _eval_batches(r, name: str, path: str) -> list[Batch]:
    from semalign_ds import data as datamod

    cfg = r.cfg
    spec = {"path": path, "format": "auto", "text_field": cfg.data.text_field}
    texts = datamod.load_texts(spec, datamod.Keys(f"eval.sets.{name}", None, "data.text_field"))
    blocks = datamod.pack_sequences(texts, r.tok_S, cfg.data.seq_len, cfg.eval.max_sequences)
    bs = cfg.eval.batch_size
    return [(blocks.ids_NT[i:i + bs], blocks.mask_NT[i:i + bs]) for i in range(0, len(blocks), bs)]


def _teacher_logits(r, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Teacher logits (collective under ZeRO-3: every rank evaluates the same batches)."""
    return r.teacher.forward_states(r.vocab.to_teacher(ids_BT), mask_BT, set(), need_logits=True)[1].float()


def _teacher_logits_student_vocab(r, ids_BT: torch.Tensor, mask_BT: torch.Tensor, V_S: int) -> torch.Tensor:
    z_T = _teacher_logits(r, ids_BT, mask_BT)
    if r.vocab.s2t is None:
        return z_T
    z_S = torch.full((*z_T.shape[:2], V_S), -1e4, device=z_T.device)  # unshared ids: ~zero teacher mass
    z_S[..., r.vocab.ids_S.to(z_T.device)] = z_T[..., r.vocab.ids_T.to(z_T.device)]
    return z_S


@torch.no_grad()
def _teacher_perplexity(r, batches: list[Batch]) -> float:
    total, count = 0.0, 0
    for ids_BT, mask_BT in batches:
        ids_BT, mask_BT = ids_BT.to(r.info.device), mask_BT.to(r.info.device)
        loss_sum, n = next_token_loss_sum(_teacher_logits(r, ids_BT, mask_BT), r.vocab.to_teacher(ids_BT), mask_BT)
        total, count = total + loss_sum, count + n
    return math.exp(total / max(count, 1))


def evaluate_run(r, export_dir) -> dict:
    """Held-out perplexity of the student before/after and the teacher, and agreement with the teacher, on each
    of eval.sets; written to <output_dir>/eval.json and eval.md and logged to MLflow."""
    import json

    from semalign_ds.models.adapters import get_adapter
    from semalign_ds.models.loading import load_causal_lm, torch_dtype
    from semalign_ds.progress import bar

    cfg, dev = r.cfg, r.info.device
    dtype = torch_dtype(cfg.student.dtype)
    before = load_causal_lm(cfg.student.path, dtype, dev, cfg.student.trust_remote_code, key="student.path")
    V_S = get_adapter(r.student).vocab_size
    ppl, agree = {}, {}
    for name, path in bar(list(cfg.eval.sets.items()), "evaluation", r):
        batches = _eval_batches(r, name, path)
        teacher_fn = lambda ids, mask: _teacher_logits_student_vocab(r, ids, mask, V_S)
        ppl[name] = {"student_before": perplexity(before, batches, dev),
                     "student_after": perplexity(r.student, batches, dev)}
        agree[name] = {}
        if r.teacher is None:  # a student trained from a spool or a stream has no teacher engine
            continue
        ppl[name]["teacher"] = _teacher_perplexity(r, batches)
        agree[name] = {"student_before": teacher_agreement(before, teacher_fn, batches, dev),
                       "student_after": teacher_agreement(r.student, teacher_fn, batches, dev)}
    summary = {"perplexity": ppl, "agreement": agree, "table": _summary_table(ppl, agree),
               "student_dir": str(export_dir), "tracking_uri": getattr(r.tracker, "uri", None)}
    if r.info.is_main:
        (r.out / "eval.json").write_text(json.dumps(summary, indent=2))
        (r.out / "eval.md").write_text(summary["table"] + "\n")
        r.tracker.log_metrics({f"eval/{s}/{m}_ppl": v for s, row in ppl.items() for m, v in row.items()})
        r.tracker.log_metrics({f"eval/{s}/{m}_{k}": v for s, row in agree.items() for m, d in row.items()
                               for k, v in d.items()})
        r.tracker.log_artifact(r.out / "eval.md")
        r.tracker.log_artifact(r.out / "eval.json")
    return summary


def _summary_table(ppl: dict, agree: dict) -> str:
    rows = []
    for model, label in (("student_before", "student before"), ("student_after", "student after"),
                         ("teacher", "teacher")):
        row = {"model": label}
        if model == "teacher" and not all(model in ppl[name] for name in ppl):
            continue  # no teacher engine in this run (spool / stream student)
        for name in ppl:
            row[f"{name} ppl"] = ppl[name][model]
            if model in agree[name]:
                row[f"{name} KL to teacher"] = agree[name][model]["kl"]
                row[f"{name} top-1 match"] = agree[name][model]["top1"]
        rows.append(row)
    columns = ["model"] + [c for c in rows[0] if c != "model"]
    return format_table(rows, columns)
