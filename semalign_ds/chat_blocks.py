"""Conversations as packed token blocks: the answers-only loss mask, and across two chat templates the teacher's own
rendering of every block with the alignment by message.

Tokens. A model's rendering (chat.render) is tokenised with offsets and no added special tokens (the template
writes them). A token belongs to message m when its END lies in m's content span (start, end]: a token that starts
in template text and ends in the content (a merged leading space) counts as content; one that ends after the
content does not.
Answers. loss_mask_NT is True on the student's tokens of assistant contents and on the first token after each (the
template's end of turn, so the student learns to stop); prompts, the rest of the template text and padding are
False. The student's losses read it (transport/packet.py): layer objectives over answer positions, the output and
label terms over predictions OF answer tokens. data.train_on_prompts: no mask (every real token, as plain text).
Two templates. When the teacher's tokenizer or template differs from the student's, the teacher reads its own
rendering of the same conversations, and the student's positions are aligned to it message by message
(alignment.align_by_message): template tokens get no teacher state, so neither side's targets cover them.
Packing. Conversations stay whole: in order, as many as fit in a block of data.seq_len student tokens (attention
runs across conversations of one block, as across documents of plain text); the block is then padded (mask False).
The teacher's block holds the same conversations in its own rendering, in the same order (U positions:
data.teacher_seq_len, else the longest block's need rounded up to 8; more than the teacher's positions is an error).
Too long. A conversation whose student rendering exceeds data.seq_len is dropped (data.chat_overlong=drop), or
truncated (=truncate) to its longest prefix of whole messages that ends with an answer and fits (dropped if none
does). Conversations past data.max_sequences blocks are left out. All counted in `TokenBlocks.stats`, logged.
Legend: N blocks, T = seq_len, U teacher positions, P tokens of one rendering.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from semalign_ds import alignment, chat
from semalign_ds import data as datamod

log = logging.getLogger("semalign_ds")
OVERLONG = ("drop", "truncate")


@dataclass(frozen=True)
class Side:
    """How one model writes conversations: its tokenizer, its chat template, and its role (for errors)."""

    tokenizer: object
    template: str
    role: str

    def place(self, messages, where: str) -> tuple[np.ndarray, alignment.Placed]:
        """(ids_P, placement) of the conversation as this model reads it."""
        return tokenize(self.tokenizer, chat.render(self.tokenizer, self.template, messages, where, self.role))


def tokenize(tokenizer, rendering: chat.Rendering) -> tuple[np.ndarray, alignment.Placed]:
    """Token ids of a rendering, and where each token lies: its message (by its end) and raw-content offsets."""
    enc = tokenizer(rendering.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    ends = np.asarray([e for _, e in enc["offset_mapping"]], dtype=np.int64)
    ends = np.maximum.accumulate(ends) if len(ends) else ends
    full = alignment.full_flags(ends)
    eff = alignment.effective_ends(ends, full, 0)
    message, rel_ends, rel_eff, content_end = np.full(len(ids), -1, np.int64), ends.copy(), eff.copy(), []
    for m, span in enumerate(rendering.spans):
        content_end.append(None if span is None else span.end - span.start + span.offset)
        if span is None:
            continue
        inside = (ends > span.start) & (ends <= span.end)
        message[inside] = m
        rel_ends[inside] += span.offset - span.start
        rel_eff[inside] += span.offset - span.start
    return ids, alignment.Placed(message, rel_ends, rel_eff, full, content_end)


def answer_masks(placed: alignment.Placed, answers: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(loss_P: answer tokens + the token closing each answer, content_P: answer tokens only)."""
    content = np.isin(placed.message_P, answers)
    loss = content.copy()
    for m in answers:
        idx = np.flatnonzero(placed.message_P == m)
        if len(idx) and idx[-1] + 1 < len(loss) and placed.message_P[idx[-1] + 1] == -1:
            loss[idx[-1] + 1] = True
    return loss, content


@dataclass
class Piece:
    """One conversation ready to pack: the student's ids and masks; with a teacher side its ids, its answer
    tokens and the alignment (teacher positions local to the conversation)."""

    ids: np.ndarray
    loss: np.ndarray
    content: np.ndarray
    truncated: bool
    messages: list
    teacher_ids: np.ndarray | None = None
    teacher_content: np.ndarray | None = None
    align: np.ndarray | None = None
    exact: np.ndarray | None = None


def _fit(conv: chat.Conversation, student: Side, seq_len: int, overlong: str):
    """(messages, ids, placement, truncated) within seq_len student tokens by the overlong rule, else None."""
    messages = list(conv.messages)
    ids, placed = student.place(messages, conv.where)
    if len(ids) <= seq_len:
        return messages, ids, placed, False
    if overlong == "truncate":
        for m in reversed([a for a in conv.answers() if a + 1 < len(messages)]):
            ids, placed = student.place(messages[:m + 1], conv.where)
            if len(ids) <= seq_len:
                return messages[:m + 1], ids, placed, True
    return None


def make_piece(conv: chat.Conversation, student: Side, teacher: Side | None, seq_len: int,
               overlong: str = "drop") -> Piece | None:
    """The conversation fitted to seq_len and read by both sides (None: dropped by the overlong rule)."""
    fit = _fit(conv, student, seq_len, overlong)
    if fit is None:
        return None
    messages, ids, placed, truncated = fit
    answers = [m for m in conv.answers() if m < len(messages)]
    loss, content = answer_masks(placed, answers)
    piece = Piece(ids, loss, content, truncated, messages)
    if teacher is not None:
        piece.teacher_ids, t_placed = teacher.place(messages, conv.where)
        piece.teacher_content = answer_masks(t_placed, answers)[1]
        piece.align, piece.exact = alignment.align_by_message(placed, t_placed)
    return piece


def _group(convs, student: Side, teacher: Side | None, seq_len: int, max_sequences: int | None,
           overlong: str) -> tuple[list[list[Piece]], dict]:
    """Whole conversations, in order, into blocks of at most seq_len student tokens; the counts."""
    counts = {"read": len(convs), "packed": 0, "truncated": 0, "dropped": 0, "left_out": 0}
    blocks, current, used = [], [], 0
    for i, conv in enumerate(convs):
        piece = make_piece(conv, student, teacher, seq_len, overlong)
        if piece is None:
            counts["dropped"] += 1
            continue
        if used + len(piece.ids) > seq_len:
            blocks.append(current)
            current, used = [], 0
            if max_sequences is not None and len(blocks) == max_sequences:
                counts["left_out"] = len(convs) - i
                break
        current.append(piece)
        used += len(piece.ids)
        counts["packed"] += 1
        counts["truncated"] += int(piece.truncated)
    else:
        if current:
            blocks.append(current)
    return blocks, counts


def _cat(pieces: list[Piece], name: str) -> np.ndarray:
    return np.concatenate([getattr(p, name) for p in pieces])


def _student_tensors(blocks: list[list[Piece]], seq_len: int, pad_id: int):
    n = len(blocks)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.int64)
    mask, loss = torch.zeros((n, seq_len), dtype=torch.bool), torch.zeros((n, seq_len), dtype=torch.bool)
    for b, pieces in enumerate(blocks):
        row = _cat(pieces, "ids")
        ids[b, :len(row)] = torch.from_numpy(row)
        mask[b, :len(row)] = True
        loss[b, :len(row)] = torch.from_numpy(_cat(pieces, "loss"))
    return ids, mask, loss


def _teacher_tensors(blocks: list[list[Piece]], seq_len: int, pad_id: int, teacher_seq_len, teacher_max, key):
    rows, aligns, exacts = [], [], []
    for pieces in blocks:
        base = np.cumsum([0] + [len(p.teacher_ids) for p in pieces[:-1]])
        rows.append(_cat(pieces, "teacher_ids"))
        align = np.concatenate([np.where(p.align >= 0, p.align + b, -1) for p, b in zip(pieces, base)])
        aligns.append(np.pad(align, (0, seq_len - len(align)), constant_values=-1))
        exacts.append(np.pad(_cat(pieces, "exact"), (0, seq_len - len(align))))
    U = alignment.teacher_len(max(len(r) for r in rows), teacher_seq_len, teacher_max, key)
    ids = torch.full((len(rows), U), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), U), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.from_numpy(row)
        mask[i, :len(row)] = True
    return ids, mask, torch.from_numpy(np.stack(aligns)), torch.from_numpy(np.stack(exacts))


def _stats(blocks: list[list[Piece]], counts: dict, seq_len: int, cross: bool) -> dict:
    pieces = [p for b in blocks for p in b]
    content = np.concatenate([p.content for p in pieces])
    stats = {**counts, "blocks": len(blocks), "seq_len": seq_len, "real_tokens": int(sum(len(p.ids) for p in pieces)),
             "answer_tokens": int(content.sum()), "loss_tokens": int(sum(p.loss.sum() for p in pieces))}
    if cross:
        align, exact = np.concatenate([p.align for p in pieces]), np.concatenate([p.exact for p in pieces])
        stats["answer_aligned_share"] = float((align[content] >= 0).mean()) if content.any() else 0.0
        stats["answer_exact_share"] = float(exact[content].mean()) if content.any() else 0.0
    return stats


def pack_conversations(convs: list[chat.Conversation], student: Side, seq_len: int, max_sequences: int | None = None,
                       teacher: Side | None = None, *, overlong: str = "drop", train_on_prompts: bool = False,
                       teacher_seq_len: int | None = None, teacher_max: int | None = None,
                       key: str = "data") -> datamod.TokenBlocks:
    """TokenBlocks of whole conversations (module docstring); `teacher`: the teacher reads its own rendering."""
    if overlong not in OVERLONG:
        raise ValueError(f"{key}.chat_overlong={overlong!r} is not one of {', '.join(OVERLONG)}")
    blocks, counts = _group(convs, student, teacher, seq_len, max_sequences, overlong)
    if not blocks:
        raise ValueError(f"{key}: none of the {counts['read']} conversations fits in {key}.seq_len={seq_len} student "
                         f"tokens (all dropped); raise {key}.seq_len, or set {key}.chat_overlong=truncate")
    ids, mask, loss = _student_tensors(blocks, seq_len, datamod.pad_id(student.tokenizer))
    stats = _stats(blocks, counts, seq_len, teacher is not None)
    cross = (None,) * 4
    if teacher is not None:
        cross = _teacher_tensors(blocks, seq_len, datamod.pad_id(teacher.tokenizer), teacher_seq_len, teacher_max,
                                 key)
    return datamod.TokenBlocks(ids, mask, torch.arange(len(blocks), dtype=torch.int64), *cross,
                               loss_mask_NT=None if train_on_prompts else loss, stats=stats)


def describe(stats: dict, key: str = "data") -> str:
    """One line for the log: what the packing kept, cut, dropped and left out, and the answer tokens."""
    line = (f"conversations: {stats['read']} read, {stats['packed']} packed whole into {stats['blocks']} blocks of "
            f"{stats['seq_len']} tokens, {stats['truncated']} truncated at an answer and {stats['dropped']} dropped "
            f"(longer than {key}.seq_len; {key}.chat_overlong), {stats['left_out']} left out ({key}.max_sequences "
            f"reached); answer tokens {stats['answer_tokens']:,} of {stats['real_tokens']:,}")
    if "answer_aligned_share" in stats:
        line += (f"; answer tokens with a teacher state {stats['answer_aligned_share']:.1%}, exact "
                 f"{stats['answer_exact_share']:.1%}")
    return line


def sides(cfg, tok_S, tok_T, vocab_differs: bool) -> tuple[Side, Side | None]:
    """(student side, teacher side or None when the teacher can read the student's rendering: same vocabulary and
    same template)."""
    d = cfg.data
    student = Side(tok_S, chat.chat_template(tok_S, d.chat_template, "data.chat_template", "student"), "student")
    teacher = Side(tok_T, chat.chat_template(tok_T, d.teacher_chat_template, "data.teacher_chat_template",
                                             "teacher"), "teacher")
    alignment.require_fast(tok_S, "student.path")
    if not vocab_differs and teacher.template == student.template:
        return student, None
    alignment.require_fast(tok_T, "teacher.path")
    return student, teacher


def load(cfg, tok_S, tok_T, student_config, teacher_config, vocab_differs: bool) -> datamod.TokenBlocks:
    """The run's transfer blocks from data.path (conversations), by the data.* chat options."""
    from semalign_ds.models.loading import model_max_positions

    d = cfg.data
    student, teacher = sides(cfg, tok_S, tok_T, vocab_differs)
    datamod.check_seq_len(d.seq_len, student_config, *([] if teacher is not None else [teacher_config]))
    convs = chat.read_conversations(d.path, d.format, "data.path")
    blocks = pack_conversations(convs, student, d.seq_len, d.max_sequences, teacher, overlong=d.chat_overlong,
                                train_on_prompts=d.train_on_prompts, teacher_seq_len=d.teacher_seq_len,
                                teacher_max=model_max_positions(teacher_config))
    log.info(describe(blocks.stats))
    return blocks
