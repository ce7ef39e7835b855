"""Held-out evaluation of a conversation run (data.chat): answer loss in bits per byte, and greedy answers.

Answer loss. Each eval set's conversations (at most eval.max_sequences, fitted to data.seq_len by
data.chat_overlong: the same conversations and messages for every model) are rendered by each model's own chat
template, one conversation per row. The loss is the negative log-likelihood, in bits, of every token that ends
inside an assistant content, given everything before it, divided by the UTF-8 bytes of those contents. The bytes
are the same for every model, so the student before, the student after and the teacher compare whatever their
tokenizers. (A token that starts in template text and ends in the content counts whole; the closing end-of-turn
token does not count.)
Generations. The first eval.generations conversations of the first eval set, cut before their last answer and
rendered with the generation prompt, are answered greedily by the student before, the student after and the
teacher (at most eval.max_new_tokens tokens, stopping at the model's end of turn). They go to eval.json, eval.md and
the MLflow table `generations.json` (one row per prompt, the `eval` column says which evaluation wrote it).
Collectives: the teacher (ZeRO-3) scores and generates on every teacher rank in lockstep (the same rows on each);
only the writing rank writes files and logs.
Legend: B rows, P tokens of a row, V vocabulary.
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from semalign_ds import chat, chat_blocks
from semalign_ds.evaluation.evaluate import format_table, model_logits

MODELS = (("student_before", "student before"), ("student_after", "student after"), ("teacher", "teacher"))


def _rows(pieces: list[chat_blocks.Piece], side: str) -> list[tuple]:
    """(ids_P, answer_P) per conversation as the student or the teacher reads it."""
    if side == "teacher" and pieces and pieces[0].teacher_ids is not None:
        return [(p.teacher_ids, p.teacher_content) for p in pieces]
    return [(p.ids, p.content) for p in pieces]


def _padded(rows: list[tuple], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids_BP = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask_BP = torch.zeros((len(rows), width), dtype=torch.bool)
    answer_BP = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, answer) in enumerate(rows):
        ids_BP[i, :len(ids)] = torch.from_numpy(ids)
        mask_BP[i, :len(ids)] = True
        answer_BP[i, :len(ids)] = torch.from_numpy(answer)
    return ids_BP, mask_BP, answer_BP


@torch.no_grad()
def answer_nll(logits_fn, rows: list[tuple], pad_id: int, batch_size: int, device) -> tuple[float, int]:
    """(sum of the answer tokens' negative log-likelihood in nats, their count); logits_fn(ids_BP, mask_BP) ->
    logits_BPV on `device`."""
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        ids, mask, answer = (t.to(device) for t in _padded(rows[i:i + batch_size], pad_id))
        logits = logits_fn(ids, mask).float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        keep = answer[:, 1:] & mask[:, :-1]
        total += float(nll[keep].double().sum())
        count += int(keep.sum())
    return total, count


def answer_bytes(pieces: list[chat_blocks.Piece]) -> int:
    """UTF-8 bytes of the supervised answers (the assistant contents of each fitted conversation)."""
    return sum(len(m["content"].encode("utf-8")) for p in pieces for m in p.messages if m["role"] == "assistant")


def eval_pieces(r, name: str, path: str) -> tuple[list[chat_blocks.Piece], list[chat.Conversation], dict]:
    """The set's conversations read by both sides (at most eval.max_sequences kept), the conversations kept, counts."""
    cfg = r.cfg
    student, teacher = chat_blocks.sides(cfg, r.tok_S, r.tok_T, r.vocab.cross)
    convs = chat.read_conversations(path, "auto", f"eval.sets.{name}")
    pieces, kept, dropped = [], [], 0
    for conv in convs:
        if len(pieces) == cfg.eval.max_sequences:
            break
        piece = chat_blocks.make_piece(conv, student, teacher, cfg.data.seq_len, cfg.data.chat_overlong)
        if piece is None:
            dropped += 1
            continue
        pieces.append(piece)
        kept.append(conv)
    if not pieces:
        raise ValueError(f"eval.sets.{name}: none of its conversations fits in data.seq_len={cfg.data.seq_len} "
                         f"student tokens; raise data.seq_len or set data.chat_overlong=truncate")
    return pieces, kept, {"conversations": len(pieces), "dropped": dropped,
                          "truncated": sum(p.truncated for p in pieces)}


def _teacher_logits(r):
    return lambda ids, mask: r.teacher.forward_states(ids, mask, set(), need_logits=True)[1]


def _bits_per_byte(r, models: dict, pieces: list[chat_blocks.Piece]) -> dict:
    from semalign_ds.data import pad_id

    cfg, dev, size = r.cfg, r.info.device, answer_bytes(pieces)
    out = {}
    for key, model in models.items():
        fn = (lambda ids, mask, m=model: model_logits(m, ids, mask))
        out[key] = answer_nll(fn, _rows(pieces, "student"), pad_id(r.tok_S), cfg.eval.batch_size, dev)
    if r.teacher is not None:
        out["teacher"] = answer_nll(_teacher_logits(r), _rows(pieces, "teacher"), pad_id(r.tok_T),
                                    cfg.eval.batch_size, dev)
    return {key: {"bits_per_byte": nll / math.log(2) / size, "answer_tokens": n, "answer_bytes": size}
            for key, (nll, n) in out.items()}


# ---------------------------------------------------------------- generations


def _stop_ids(tokenizer, model) -> list[int]:
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({int(i) for i in ids if i is not None})


@torch.no_grad()
def generate(model, tokenizer, template: str, messages: list[dict], max_new_tokens: int, device, role: str,
             synced: bool = False) -> str:
    """The model's greedy answer to `messages` rendered with its template's generation prompt (special tokens
    dropped, surrounding whitespace stripped). synced: every rank of a ZeRO-3 group generates in lockstep."""
    from transformers import GenerationConfig

    text = chat.render(tokenizer, template, messages, "a generation prompt", role, generation_prompt=True).text
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], dtype=torch.int64, device=device)
    stop = _stop_ids(tokenizer, model)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                              pad_token_id=stop[0])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                         synced_gpus=synced)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def generations(r, models: dict, convs: list[chat.Conversation]) -> list[dict]:
    """One row per held-out prompt: set aside, the prompt, the reference answer and every model's greedy answer."""
    import torch.distributed as dist

    cfg, dev = r.cfg, r.info.device
    student, teacher = chat_blocks.sides(cfg, r.tok_S, r.tok_T, r.vocab.cross)
    teacher = teacher or chat_blocks.Side(r.tok_T, student.template, "teacher")
    synced = dist.is_initialized() and dist.get_world_size(r.group) > 1
    rows = []
    for conv in convs[:cfg.eval.generations]:
        messages, reference = chat.prompt_of(conv)
        row = {"prompt": "\n".join(f"{m['role']}: {m['content']}" for m in messages), "reference": reference}
        for key, model in models.items():
            row[key] = generate(model, r.tok_S, student.template, messages, cfg.eval.max_new_tokens, dev, "student")
        if r.teacher is not None:
            row["teacher"] = generate(r.teacher.model, r.tok_T, teacher.template, messages, cfg.eval.max_new_tokens,
                                      dev, "teacher", synced)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- the end-of-run evaluation


def summary_table(bpb: dict) -> str:
    rows = []
    for key, label in MODELS:
        if not all(key in per_set for per_set in bpb.values()):
            continue  # no teacher engine in this run (a spool or stream student)
        rows.append({"model": label, **{f"{name} answer bits/byte": per_set[key]["bits_per_byte"]
                                        for name, per_set in bpb.items()}})
    return format_table(rows, ["model"] + [c for c in rows[0] if c != "model"])


def generations_markdown(rows: list[dict]) -> str:
    parts = []
    for i, row in enumerate(rows, 1):
        parts.append(f"### Prompt {i}\n\n```\n{row['prompt']}\n```\n\n- reference: {row['reference']!r}")
        parts += [f"- {label}: {row[key]!r}" for key, label in MODELS if key in row]
        parts.append("")
    return "\n".join(parts)


def _log(r, summary: dict, stage_table: str, label: str) -> None:
    (r.out / "eval.json").write_text(json.dumps(summary, indent=2))
    stages = f"\n## Training, per stage\n\n{stage_table}\n" if stage_table else ""
    gens = f"\n## Greedy answers to held-out prompts\n\n{generations_markdown(summary['generations'])}" \
        if summary["generations"] else ""
    (r.out / "eval.md").write_text(summary["table"] + "\n" + stages + gens)
    r.tracker.log_metrics({f"eval/{s}/{m}_answer_bpb": v["bits_per_byte"] for s, row in summary["answer_loss"].items()
                           for m, v in row.items()})
    r.tracker.log_metrics({f"data/chat_{k}": float(v) for k, v in (summary["chat_data"] or {}).items()})
    if summary["generations"]:
        columns = ["prompt", "reference"] + [key for key, _ in MODELS if key in summary["generations"][0]]
        r.tracker.log_table({"eval": [label] * len(summary["generations"]),
                             **{c: [row[c] for row in summary["generations"]] for c in columns}}, "generations.json")
    r.tracker.log_artifact(r.out / "eval.md")
    r.tracker.log_artifact(r.out / "eval.json")


def evaluate_chat_run(r, export_dir, stage_table: str = "") -> dict:
    """Answer bits per byte of the student before/after and the teacher on each of eval.sets, and the greedy
    answers to a few held-out prompts; written to eval.json / eval.md and logged to MLflow (with the table)."""
    from semalign_ds.models.loading import load_causal_lm, torch_dtype
    from semalign_ds.progress import bar

    cfg, dev = r.cfg, r.info.device
    before = load_causal_lm(cfg.student.path, torch_dtype(cfg.student.dtype), dev, cfg.student.trust_remote_code,
                            key="student.path")
    models = {"student_before": before, "student_after": r.student}
    bpb, counts, gens = {}, {}, []
    for i, (name, path) in enumerate(bar(list(cfg.eval.sets.items()), "evaluation", r)):
        pieces, convs, counts[name] = eval_pieces(r, name, path)
        bpb[name] = _bits_per_byte(r, models, pieces)
        if i == 0 and cfg.eval.generations > 0:
            gens = generations(r, models, convs)
    summary = {"answer_loss": bpb, "eval_sets": counts, "chat_data": r.blocks.stats, "generations": gens,
               "table": summary_table(bpb) if bpb else "", "student_dir": str(export_dir),
               "tracking_uri": getattr(r.tracker, "uri", None)}
    if r.info.is_main:
        _log(r, summary, stage_table, "end of run")
    return summary
