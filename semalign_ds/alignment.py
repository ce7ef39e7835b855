"""Cross-tokenizer packing: the teacher reads the student's blocks with its own tokenizer, and every student
position is paired with a teacher position by character offsets (METHOD.md §9).

Coordinates. The documents are laid end to end in one character axis: document d occupies [base_d, base_d + len_d)
followed by one virtual separator character at base_d + len_d (base_{d+1} = base_d + len_d + 1). Both tokenizers'
EOS tokens cover exactly that separator, so document boundaries align exactly. A token's *end* is the end of its
offset span on this axis (fast tokenizers' offset mappings; a byte-level BPE token reports the characters its
bytes belong to).

Partial tokens. A byte-level tokenizer may split one character into several tokens; all of them report the same
end. Only the last of such a run has consumed the whole character: it is *full*, the others are *partial*, and a
partial token's effective end is the end of the last full token before it (the character's start).

The rule. Student position t takes the teacher state at the LAST FULL teacher token whose end is at or before the
student token's effective end; -1 (no teacher state) if there is none. The position is *exact* when the student
token is full and that teacher token ends exactly where the student token ends: then both models predict a next
token that starts at the same character, and the teacher's next-token distribution is a target for the student's.
A teacher state never covers a character after the student token's end (no look-ahead across the pair).

Blocks. The student stream is cut into blocks of T tokens as in the same-tokenizer path. The teacher reads the
characters of each block on its own, from the block's first character (the end of the token before it) to the
effective end of its last token, tokenised afresh; like the student it has no context from before the block.
A document cut by a block boundary is read from the cut. The teacher's block has U positions (padded, mask
False); a block that needs more than U teacher tokens is an error, never truncated. A teacher whose tokenizer
starts every text with BOS (Gemma: without it its loss on English prose is ~100x worse) reads each block after
its BOS token, which covers no character (end = the block's start) and is never an aligned position.

Conversations (chat_blocks.py). Two chat templates write the same conversation as two different texts, so there
is no common character axis for a whole rendering; each message's content is one instead. `align_by_message`
applies the rule above inside each message, on the raw content's coordinates (`Placed`); tokens of template text
(role markers, separators) are aligned to nothing, and a student token ending at its content's end is never exact
(what follows it is each template's own text).

Legend: N blocks, T student positions, U teacher positions. ids_NT / teacher_ids_NU int64, masks bool,
align_NT int64 (teacher position or -1), exact_NT bool.
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

_CHUNK = 256  # documents (or pieces) per tokenizer call


@dataclass
class Stream:
    """Tokens of the concatenated documents: ids, ends on the character axis, full flags (numpy arrays)."""

    ids: np.ndarray
    ends: np.ndarray
    full: np.ndarray


def require_fast(tokenizer, key: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{key}: cross-tokenizer transfer aligns positions by character offsets, which only fast "
                         f"tokenizers report; {type(tokenizer).__name__} is not one. Save a fast tokenizer "
                         f"(tokenizer.json) with the model")


def doc_bases(texts: Sequence[str]) -> list[int]:
    """Start of each document on the character axis (each is followed by one separator character)."""
    bases, pos = [], 0
    for text in texts:
        bases.append(pos)
        pos += len(text) + 1
    return bases


def full_flags(ends: np.ndarray) -> np.ndarray:
    """True where a token is the last of a run of tokens sharing one end (it has consumed the whole character)."""
    full = np.ones(len(ends), dtype=bool)
    if len(ends) > 1:
        full[:-1] = ends[1:] != ends[:-1]
    return full


def effective_ends(ends: np.ndarray, full: np.ndarray, start: int) -> np.ndarray:
    """A full token's end; a partial token's the end of the last full token before it (else `start`)."""
    last_full = np.where(full, ends, -1)
    last_full = np.maximum.accumulate(np.concatenate([[start], last_full]))[:-1]  # strictly before each token
    return np.where(full, ends, last_full)


def _offset_ends(tokenizer, pieces: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    ids, ends = [], []
    for i in range(0, len(pieces), _CHUNK):
        enc = tokenizer(list(pieces[i:i + _CHUNK]), add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)
        ids += enc["input_ids"]
        ends += [[int(e) for _, e in offsets] for offsets in enc["offset_mapping"]]
    return ids, ends


def student_stream(texts: Sequence[str], tokenizer, eos_id: int | None, limit: int | None) -> Stream:
    """The student's token stream (the same ids as the same-tokenizer path) with ends and full flags."""
    bases = doc_bases(texts)
    ids: list[int] = []
    ends: list[int] = []
    for start in range(0, len(texts), _CHUNK):
        chunk_ids, chunk_ends = _offset_ends(tokenizer, list(texts[start:start + _CHUNK]))
        for d, (doc_ids, doc_ends) in enumerate(zip(chunk_ids, chunk_ends), start):
            ids += doc_ids
            ends += [bases[d] + e for e in doc_ends]
            if eos_id is not None:
                ids.append(eos_id)
                ends.append(bases[d] + len(texts[d]) + 1)
        if limit is not None and len(ids) >= limit:
            break
    ids, ends = ids[:limit], ends[:limit]
    ends_np = np.maximum.accumulate(np.asarray(ends, dtype=np.int64)) if ends else np.zeros(0, np.int64)
    return Stream(np.asarray(ids, dtype=np.int64), ends_np, full_flags(ends_np))


def block_pieces(texts: Sequence[str], bases: list[int], a: int, b: int) -> list[tuple[int, str, bool]]:
    """The characters [a, b) as (axis start, text, separator follows) per document touched, in order."""
    pieces = []
    d = max(0, bisect.bisect_right(bases, a) - 1)
    while d < len(texts) and bases[d] < b:
        lo, hi = max(a - bases[d], 0), min(b - bases[d], len(texts[d]))
        separator = a <= bases[d] + len(texts[d]) < b
        if lo < hi or separator:
            pieces.append((bases[d] + lo, texts[d][lo:hi], separator))
        d += 1
    return pieces


def align_positions(s_eff: np.ndarray, s_ends: np.ndarray, s_full: np.ndarray, t_ends: np.ndarray,
                    t_full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(align, exact) for student tokens against one teacher sequence (see the rule in the module docstring)."""
    full_idx = np.flatnonzero(t_full)
    if not len(full_idx):
        return np.full(len(s_eff), -1, dtype=np.int64), np.zeros(len(s_eff), dtype=bool)
    full_ends = t_ends[full_idx]
    j = np.searchsorted(full_ends, s_eff, side="right") - 1
    found = j >= 0
    j = np.clip(j, 0, None)
    align = np.where(found, full_idx[j], -1).astype(np.int64)
    exact = found & s_full & (full_ends[j] == s_ends)
    return align, exact


def bos_prefix(tokenizer) -> int | None:
    """The BOS id the tokenizer starts every text with when it adds special tokens (Gemma's), else None."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return bos if tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None


def _teacher_block(pieces, tok_T, eos_T: int | None, start: int = 0,
                   bos_T: int | None = None) -> tuple[list[int], list[int]]:
    """Teacher ids and axis ends of one block's pieces (an EOS for each separator the block holds), after a BOS
    ending at `start` when the teacher reads texts after one."""
    ids_per, ends_per = _offset_ends(tok_T, [text for _, text, _ in pieces])
    ids: list[int] = [] if bos_T is None else [bos_T]
    ends: list[int] = [] if bos_T is None else [start]
    for (start, text, separator), p_ids, p_ends in zip(pieces, ids_per, ends_per):
        ids += p_ids
        ends += [start + e for e in p_ends]
        if separator and eos_T is not None:
            ids.append(eos_T)
            ends.append(start + len(text) + 1)
    return ids, ends


@dataclass
class CrossBlocks:
    teacher_ids_NU: torch.Tensor
    teacher_mask_NU: torch.Tensor
    align_NT: torch.Tensor
    exact_NT: torch.Tensor
    teacher_bytes_N: np.ndarray  # UTF-8 bytes the teacher's predicted tokens of each block cover (bits per byte)


def teacher_blocks(texts: Sequence[str], stream: Stream, seq_len: int, tok_T, teacher_pad: int,
                   teacher_eos: int | None, teacher_seq_len: int | None, teacher_max: int | None,
                   key: str = "data") -> CrossBlocks:
    """The teacher's view of each student block of `seq_len` tokens of `stream` (see the module docstring)."""
    bases = doc_bases(texts)
    axis_bytes = prefix_bytes(texts, int(stream.ends[-1]) if len(stream.ends) else 0)
    s_eff = effective_ends(stream.ends, stream.full, 0)
    n = -(-len(stream.ids) // seq_len)
    bos = bos_prefix(tok_T)
    rows, aligns, exacts, nbytes = [], [], [], []
    for i in range(n):
        lo, hi = i * seq_len, min((i + 1) * seq_len, len(stream.ids))
        a = int(s_eff[lo - 1]) if lo > 0 else 0
        b = int(s_eff[hi - 1])
        t_ids, t_ends = _teacher_block(block_pieces(texts, bases, a, b), tok_T, teacher_eos, a, bos)
        t_ends_np = np.maximum.accumulate(np.asarray(t_ends, dtype=np.int64)) if t_ends else np.zeros(0, np.int64)
        t_full = full_flags(t_ends_np)
        t_full[:int(bos is not None)] = False  # BOS covers no character: never an aligned position
        blk_eff = effective_ends(stream.ends[lo:hi], stream.full[lo:hi], a)
        align, exact = align_positions(blk_eff, stream.ends[lo:hi], stream.full[lo:hi], t_ends_np, t_full)
        rows.append(t_ids)
        nbytes.append(int(axis_bytes[t_ends_np[-1]] - axis_bytes[t_ends_np[0]]))  # tokens 2.. are predicted
        aligns.append(np.pad(align, (0, seq_len - len(align)), constant_values=-1))
        exacts.append(np.pad(exact, (0, seq_len - len(exact))))
    U = teacher_len(max(len(r) for r in rows), teacher_seq_len, teacher_max, key)
    ids_NU = torch.full((n, U), teacher_pad, dtype=torch.int64)
    mask_NU = torch.zeros((n, U), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids_NU[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
        mask_NU[i, :len(row)] = True
    return CrossBlocks(ids_NU, mask_NU, torch.from_numpy(np.stack(aligns)), torch.from_numpy(np.stack(exacts)),
                       np.asarray(nbytes, dtype=np.int64))


def prefix_bytes(texts: Sequence[str], upto: int | None = None) -> np.ndarray:
    """P[c] = UTF-8 bytes of the character axis [0, c) (each document's separator counts as one byte, as the EOS
    token that covers it is predicted like a newline), for the documents that start before `upto` (all: None)."""
    sizes, pos = [], 0
    for text in texts:
        if upto is not None and pos > upto:
            break
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        sizes += [1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000), np.ones(1, np.int64)]
        pos += len(text) + 1
    flat = np.concatenate(sizes).astype(np.int64) if sizes else np.zeros(0, np.int64)
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(flat)])


def student_block_bytes(texts: Sequence[str], stream: Stream, seq_len: int) -> np.ndarray:
    """UTF-8 bytes the predicted tokens (the 2nd to the last) of each block of `seq_len` tokens of `stream`
    cover: from the effective end of the block's first token to that of its last."""
    s_eff = effective_ends(stream.ends, stream.full, 0)
    axis_bytes = prefix_bytes(texts, int(stream.ends[-1]) if len(stream.ends) else 0)
    firsts = np.arange(0, len(stream.ids), seq_len)
    lasts = np.minimum(firsts + seq_len, len(stream.ids)) - 1
    return axis_bytes[s_eff[lasts]] - axis_bytes[s_eff[firsts]]


def teacher_len(needed: int, teacher_seq_len: int | None, teacher_max: int | None, key: str) -> int:
    """U: data.teacher_seq_len, else the longest block's need rounded up to a multiple of 8; never truncating."""
    if teacher_seq_len is not None and needed > teacher_seq_len:
        raise ValueError(f"{key}.teacher_seq_len={teacher_seq_len} is too short: a block's text takes {needed} "
                         f"teacher tokens; set {key}.teacher_seq_len to at least {needed} (or null to derive it)")
    U = teacher_seq_len if teacher_seq_len is not None else -(-needed // 8) * 8
    if teacher_max is not None and U > teacher_max:
        raise ValueError(f"the teacher reads each block of {key}.seq_len student tokens as up to {needed} of its own "
                         f"tokens ({key}.teacher_seq_len {U}), more than its {teacher_max} positions; lower "
                         f"{key}.seq_len")
    return U


@dataclass
class Placed:
    """One model's tokens of one rendered conversation, placed in the messages' raw contents: message_P (message
    index, -1 for template text), ends_P / eff_P (end and effective end relative to the content's raw start),
    full_P, and per message the raw end of its content as rendered (None: the template leaves it out)."""

    message_P: np.ndarray
    ends_P: np.ndarray
    eff_P: np.ndarray
    full_P: np.ndarray
    content_end: list[int | None]


def align_by_message(s: Placed, t: Placed) -> tuple[np.ndarray, np.ndarray]:
    """(align, exact) of the student's tokens against the teacher's, message by message (module docstring): a
    student token of message m takes the last full teacher token of message m ending at or before its effective
    end (-1: none, and always -1 for template tokens); exact as in `align_positions`, but never at the end of the
    content."""
    align = np.full(len(s.message_P), -1, dtype=np.int64)
    exact = np.zeros(len(s.message_P), dtype=bool)
    for m, (end_s, end_t) in enumerate(zip(s.content_end, t.content_end)):
        s_idx, t_idx = np.flatnonzero(s.message_P == m), np.flatnonzero(t.message_P == m)
        if end_s is None or end_t is None or not len(s_idx) or not len(t_idx):
            continue
        a, e = align_positions(s.eff_P[s_idx], s.ends_P[s_idx], s.full_P[s_idx], t.ends_P[t_idx], t.full_P[t_idx])
        align[s_idx] = np.where(a >= 0, t_idx[np.clip(a, 0, None)], -1)
        exact[s_idx] = e & (s.ends_P[s_idx] < min(end_s, end_t))
    return align, exact
