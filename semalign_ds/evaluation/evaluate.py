"""Evaluation helpers for plain Hugging Face causal LMs (no DeepSpeed).

Batches are pairs ``(ids_BT, mask_BT)``: int64 token ids and a bool mask (True = real token).
Padding may sit on either side: positions are recomputed from the mask, so a padded sequence
scores exactly like the same sequence unpadded.

Shape legend: B batch, T tokens, V vocabulary. ``logits_BTV`` holds the prediction for the
token that follows position t.

- ``perplexity``: exp of the mean next-token cross-entropy over pairs (t, t+1) where both tokens
  are real; ``nll_sum`` the summed cross-entropy (nats) and the pair count behind it.
- bits per byte (the end-of-run evaluation's primary metric, as lm-eval reports it): a model's summed
  next-token NLL over a held-out set / (ln 2 x the UTF-8 bytes its predicted tokens cover). It needs no shared
  tokenizer, so student and teacher columns compare directly; perplexity per own token stays beside it.
- ``teacher_agreement``: KL(teacher || student) and top-1 match rate, averaged over real tokens;
  the teacher's logits come from a callable so they can be produced by any engine.
- ``format_table``: a markdown table for summaries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from semalign_ds import files
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
def nll_sum(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device | str) -> tuple[float, int]:
    """(summed next-token cross-entropy in nats, number of predicted tokens) of ``model`` over ``batches``."""
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
    return total, count


def perplexity(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device | str) -> float:
    """exp(mean next-token cross-entropy) of ``model`` over ``batches`` (token-weighted)."""
    total, count = nll_sum(model, batches, device)
    return math.exp(total / count)


def bits_per_byte(nats: float, nbytes: int) -> float:
    """Summed NLL in nats over text of `nbytes` UTF-8 bytes, in bits per byte."""
    if nbytes <= 0:
        raise ValueError("bits per byte: the predicted tokens cover no byte of text")
    return nats / (math.log(2) * nbytes)


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


def _eval_batches(r, name: str, path: str) -> tuple[list, list[int], list[int]]:
    """The eval set packed like the transfer data (data.Batch rows); with a different teacher tokenizer and a
    teacher at hand also the teacher's tokens and the alignment. Also the UTF-8 bytes each batch's predicted
    tokens cover, for the student and for the teacher (bits per byte)."""
    from semalign_ds import data as datamod
    from semalign_ds.models.loading import model_max_positions

    cfg = r.cfg
    spec = {"path": path, "format": "auto", "text_field": cfg.data.text_field}
    texts = datamod.load_texts(spec, datamod.Keys(f"eval.sets.{name}", None, "data.text_field"))
    cross = r.vocab.cross and r.teacher is not None
    key = f"eval.sets.{name}"
    blocks = datamod.pack_sequences(
        texts, r.tok_S, cfg.data.seq_len, cfg.eval.max_sequences, key=key,
        teacher_tokenizer=r.tok_T if cross else None,
        teacher_max_positions=model_max_positions(r.teacher.model.config) if cross else None)
    s_bytes, t_bytes = _block_bytes(texts, blocks, r.tok_S, r.tok_T if cross else None)
    bs = cfg.eval.batch_size
    cuts = range(0, len(blocks), bs)
    return ([blocks.take(slice(i, i + bs)) for i in cuts], [int(s_bytes[i:i + bs].sum()) for i in cuts],
            [int(t_bytes[i:i + bs].sum()) for i in cuts])


def _block_bytes(texts, blocks, tok_S, tok_T=None):
    """(student, teacher) UTF-8 bytes the predicted tokens of each block cover (alignment.py's character axis);
    the teacher's are the student's when it reads the student's tokens."""
    from semalign_ds import alignment

    stream = alignment.student_stream(list(texts), tok_S, tok_S.eos_token_id, len(blocks) * blocks.seq_len)
    if not torch.equal(torch.from_numpy(stream.ids), blocks.ids_NT[blocks.mask_NT]):
        raise RuntimeError("the byte count's token stream differs from the packed evaluation blocks")
    s_bytes = alignment.student_block_bytes(list(texts), stream, blocks.seq_len)
    if tok_T is None:
        return s_bytes, s_bytes
    cross = alignment.teacher_blocks(list(texts), stream, blocks.seq_len, tok_T, 0, tok_T.eos_token_id, None, None)
    return s_bytes, cross.teacher_bytes_N


def _student_pairs(batches: list) -> list[Batch]:
    return [(b.ids_BT, b.mask_BT) for b in batches]


def _bucket_sums(zs_BTV: torch.Tensor, zt_BTV: torch.Tensor, valid_BT: torch.Tensor, ids_T: torch.Tensor,
                 ids_S: torch.Tensor) -> tuple[float, float, int]:
    """KL(teacher || student) over the shared vocabulary plus one bucket for the rest of each side's mass, and
    top-1 agreement (the teacher's argmax over its whole vocabulary, if shared, equals the student's)."""
    zs, zt = zs_BTV[valid_BT].float(), zt_BTV[valid_BT].float()
    if zs.shape[0] == 0:
        return 0.0, 0.0, 0
    p_all, q_all = torch.softmax(zt, -1), torch.softmax(zs, -1)
    p, q = p_all[:, ids_T.to(zt.device)], q_all[:, ids_S.to(zs.device)]
    p = torch.cat([p, (1 - p.sum(-1, keepdim=True)).clamp_min(0)], -1)
    q = torch.cat([q, (1 - q.sum(-1, keepdim=True)).clamp_min(0)], -1).clamp_min(1e-30)
    kl = (p * (torch.log(p.clamp_min(1e-30)) - torch.log(q))).sum(-1)
    t2s = torch.full((zt.shape[-1],), -1, dtype=torch.long, device=zt.device)
    t2s[ids_T.to(zt.device)] = ids_S.to(zt.device)
    top1 = t2s[zt.argmax(-1)] == zs.argmax(-1)
    return float(kl.double().sum()), float(top1.sum()), int(valid_BT.sum())


_LOGIT_BYTES = 1 << 28  # teacher logits held at once in the evaluation (rows of U x V float32), 256 MiB


@torch.no_grad()
def _teacher_columns(r, students: dict, batches: list) -> tuple[float, float, dict]:
    """The teacher's summed NLL (nats), its perplexity and each student's agreement with it, one teacher forward
    per row chunk (as many rows of a batch as keep U x V teacher logits within _LOGIT_BYTES: one row of a
    262k-vocabulary teacher).

    Same tokenizer: the teacher's own perplexity; KL and top-1 over every real token and the whole vocabulary.
    Different tokenizers: the teacher's perplexity per student-token equivalent, exp(the teacher's total NLL over
    the same characters, on its own tokens, / the student's number of predicted tokens), comparable with the
    students' column only roughly (a teacher that reads after BOS also predicts its first token); its bits per
    byte are exact. KL and top-1 only at exact positions (both predict a token starting at the same character),
    over the shared vocabulary plus one bucket for the rest of each side's mass.
    """
    nll, pairs = 0.0, 0
    sums = {name: [0.0, 0.0, 0] for name in students}
    for batch in batches:
        width = (batch.teacher_ids_BU if batch.teacher_ids_BU is not None else batch.ids_BT).shape[1]
        step = max(1, _LOGIT_BYTES // (4 * width * r.teacher.adapter.vocab_size))
        for start in range(0, len(batch.ids_BT), step):
            part, got_pairs = _teacher_rows(r, students, batch.rows(slice(start, start + step)), sums)
            nll, pairs = nll + part, pairs + got_pairs
    agree = {name: {"kl": k / max(n, 1), "top1": t / max(n, 1)} for name, (k, t, n) in sums.items()}
    return nll, math.exp(nll / max(pairs, 1)), agree


def _teacher_rows(r, students: dict, batch, sums: dict) -> tuple[float, int]:
    """One teacher forward on `batch`: (its summed NLL, the students' predicted-token count); adds each student's
    agreement sums into `sums`."""
    from semalign_ds.engines.teacher import gather_positions
    from semalign_ds.run.supervision import teacher_view

    dev = r.info.device
    ids_T, mask_T = (t.to(dev) for t in teacher_view(batch))
    zt = r.teacher.forward_states(ids_T, mask_T, set(), need_logits=True)[1].float()
    nll = next_token_loss_sum(zt, ids_T, mask_T)[0]
    ids, mask = batch.ids_BT.to(dev), batch.mask_BT.to(dev)
    if r.vocab.cross:
        zt = gather_positions(zt, batch.align_BT.to(dev))
        valid = mask & (batch.exact_BT & (batch.align_BT >= 0)).to(dev)
    for name, model in students.items():
        zs = model_logits(model, ids, mask)
        got = (_bucket_sums(zs, zt, valid, r.vocab.ids_T, r.vocab.ids_S) if r.vocab.cross
               else _agreement_sums(zs, zt, mask))
        sums[name] = [a + b for a, b in zip(sums[name], got)]
    return nll, int((mask[:, :-1] & mask[:, 1:]).sum())


def evaluate_run(r, export_dir, stage_table: str = "") -> dict:
    """Held-out bits per byte and perplexity of the student before/after and the teacher, and agreement with the
    teacher, on each of eval.sets; written to <output_dir>/eval.json and eval.md (with the per-stage training
    table) and logged to MLflow."""
    from semalign_ds.models.loading import load_causal_lm, torch_dtype
    from semalign_ds.progress import bar

    if r.cfg.data.chat:  # conversations: answer bits per byte and greedy answers (chat_eval.py)
        from semalign_ds.evaluation.chat_eval import evaluate_chat_run

        return evaluate_chat_run(r, export_dir, stage_table)
    cfg, dev = r.cfg, r.info.device
    dtype = torch_dtype(cfg.student.dtype)
    before = load_causal_lm(cfg.student.path, dtype, dev, cfg.student.trust_remote_code, key="student.path")
    ppl, bpb, agree = {}, {}, {}
    for name, path in bar(list(cfg.eval.sets.items()), "evaluation", r):
        batches, s_bytes, t_bytes = _eval_batches(r, name, path)
        ppl[name], bpb[name] = {}, {}
        for label, model in (("student_before", before), ("student_after", r.student)):
            nats, count = nll_sum(model, _student_pairs(batches), dev)
            ppl[name][label], bpb[name][label] = math.exp(nats / count), bits_per_byte(nats, sum(s_bytes))
        agree[name] = {}
        if r.teacher is None:  # a student trained from a spool or a stream has no teacher engine
            continue
        nats, ppl[name]["teacher"], agree[name] = _teacher_columns(
            r, {"student_before": before, "student_after": r.student}, batches)
        bpb[name]["teacher"] = bits_per_byte(nats, sum(t_bytes))
    summary = {"bits_per_byte": bpb, "perplexity": ppl, "agreement": agree,
               "table": _summary_table(bpb, ppl, agree, r.vocab.cross),
               "student_dir": str(export_dir), "tracking_uri": getattr(r.tracker, "uri", None)}
    if r.info.is_main:
        _write_and_log(r, summary, stage_table)
    return summary


def _write_and_log(r, summary: dict, stage_table: str) -> None:
    import json

    files.write_bytes(r.out / "eval.json", json.dumps(summary, indent=2).encode(), "the evaluation results")
    stages = f"\n## Training, per stage\n\n{stage_table}\n" if stage_table else ""
    files.write_bytes(r.out / "eval.md", (summary["table"] + "\n" + stages).encode(), "the evaluation table")
    r.tracker.log_metrics({f"eval/{s}/{m}_ppl": v for s, row in summary["perplexity"].items() for m, v in row.items()})
    r.tracker.log_metrics({f"eval/{s}/{m}_bpb": v for s, row in summary["bits_per_byte"].items()
                           for m, v in row.items()})
    r.tracker.log_metrics({f"eval/{s}/{m}_{k}": v for s, row in summary["agreement"].items() for m, d in row.items()
                           for k, v in d.items()})
    r.tracker.log_artifact(r.out / "eval.md")
    r.tracker.log_artifact(r.out / "eval.json")


def _summary_table(bpb: dict, ppl: dict, agree: dict, cross: bool = False) -> str:
    rows = []
    for model, label in (("student_before", "student before"), ("student_after", "student after"),
                         ("teacher", "teacher")):
        row = {"model": label}
        if model == "teacher" and not all(model in ppl[name] for name in ppl):
            continue  # no teacher engine in this run (spool / stream student)
        for name in ppl:
            row[f"{name} bits/byte"] = bpb[name][model]
            row[f"{name} ppl"] = ppl[name][model]
            if model in agree[name]:
                row[f"{name} KL to teacher"] = agree[name][model]["kl"]
                row[f"{name} top-1 match"] = agree[name][model]["top1"]
        rows.append(row)
    columns = ["model"] + [c for c in rows[0] if c != "model"]
    if cross and rows[-1]["model"] == "teacher":  # say what the teacher's numbers mean (see _teacher_columns)
        columns = [(c, c.replace(" ppl", " ppl (teacher: per student token)").replace(
            "KL to teacher", "KL to teacher (exact pos., shared vocab + rest)")) for c in columns]
    return format_table(rows, columns)
