"""Token surfaces: the bytes of text a token stands for, so that two tokenizers' vocabularies can be matched by what
their tokens spell rather than by how each writes them down (METHOD.md §9).

Vocabulary strings differ in notation across families: a byte-level BPE (GPT-2, Llama 3, SmolLM2, the demo's)
writes each byte as a printable character (a space is 'Ġ'); a SentencePiece-style BPE (Gemma, Llama 2) writes a
space as '▁' and keeps bytes it cannot spell as '<0xNN>' tokens (byte fallback). Compared verbatim, 'Ġthe' and
'▁the' never match, so nearly every word-initial token of such a pair falls outside the shared vocabulary.
`surfaces(tok)` reads the notation from the fast tokenizer's own decoder (ByteLevel; Replace '▁' -> ' ';
ByteFallback) and returns {surface bytes: id}:
- byte-level: every character mapped back through the byte alphabet;
- '▁'-style: '▁' -> ' ', '<0xNN>' -> the byte NN (only with ByteFallback);
- anything else (a slow tokenizer, a word-level model): the string's UTF-8 bytes, i.e. verbatim matching;
- added tokens: special ones are left out (two models' control tokens mean different things), the others stand
  for their literal content.
Where several ids spell the same bytes, an ordinary token wins over a byte-fallback one (it is the one the
tokenizer emits), then the lowest id, so the match is one-to-one.
"""
from __future__ import annotations

import json
import re

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's bytes_to_unicode), inverted: printable character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_kinds(tok) -> set[str]:
    """The decoder steps of a fast tokenizer: 'bytelevel', 'metaspace' (▁ = space), 'bytefallback'."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return set()
    decoder = json.loads(backend.decoder.__getstate__())
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    kinds = set()
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            kinds.add("bytelevel")
        elif kind == "Metaspace" or (kind == "Replace" and step.get("pattern", {}).get("String") == "▁"
                                      and step.get("content") == " "):
            kinds.add("metaspace")
        elif kind == "ByteFallback":
            kinds.add("bytefallback")
    return kinds


def _spell(token: str, kinds: set[str], alphabet: dict[str, int]) -> tuple[bytes | None, bool]:
    """(surface bytes, is a byte-fallback token) of one vocabulary string; None if it spells nothing."""
    if "bytelevel" in kinds:
        if all(ch in alphabet for ch in token):
            return bytes(alphabet[ch] for ch in token), False
        return token.encode("utf-8", "surrogatepass"), False
    if "bytefallback" in kinds:
        match = _BYTE_TOKEN.match(token)
        if match:
            return bytes([int(match.group(1), 16)]), True
    if "metaspace" in kinds:
        token = token.replace("▁", " ")
    return token.encode("utf-8", "surrogatepass"), False


def surfaces(tok) -> dict[bytes, int]:
    """{surface bytes: token id} of a tokenizer's vocabulary (see the module docstring), one id per surface."""
    kinds, alphabet = _decoder_kinds(tok), byte_alphabet()
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    special = {i for i, t in added.items() if getattr(t, "special", False)}
    special |= set(getattr(tok, "all_special_ids", []) or [])
    ranked: dict[bytes, tuple[bool, int]] = {}
    for token, i in tok.get_vocab().items():
        if i in special:
            continue
        if i in added:
            spelled, fallback = added[i].content.encode("utf-8", "surrogatepass"), False
        else:
            spelled, fallback = _spell(token, kinds, alphabet)
        if spelled and (spelled not in ranked or (fallback, i) < ranked[spelled]):
            ranked[spelled] = (fallback, i)
    return {spelled: i for spelled, (_, i) in ranked.items()}
