"""Token surfaces: a SentencePiece-style vocabulary ('▁', byte fallback) and a byte-level one ('Ġ', byte alphabet)
match by the bytes their tokens spell; control tokens never match, the EOS tokens pair."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from semalign_ds.method.basis import shared_vocabulary
from semalign_ds.method.surface import byte_alphabet, surfaces
from test_cross_tokenizer import EOS, byte_bpe


def metaspace_bpe() -> PreTrainedTokenizerFast:
    """A Gemma-like BPE: spaces normalised to '▁', bytes it cannot spell as <0xNN> tokens, <bos>/<eos> controls."""
    vocab = {"<unk>": 0, "<eos>": 1, "<bos>": 2, "<0x41>": 3, "<0xC3>": 4, "<0xA9>": 5, "A": 6, "▁the": 7,
             "the": 8, "▁": 9, "t": 10, "h": 11, "e": 12, "▁t": 13, "▁th": 14, "<h1>": 15}
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    fast.add_tokens(["<h1>"])  # an added token that is ordinary text
    return fast


def test_byte_alphabet_is_a_bijection_onto_bytes():
    alphabet = byte_alphabet()
    assert sorted(alphabet.values()) == list(range(256)) and alphabet["Ġ"] == 32 and alphabet["A"] == 65


def test_metaspace_surfaces():
    tok = metaspace_bpe()
    spelled = surfaces(tok)
    assert spelled[b" the"] == 7 and spelled[b"the"] == 8 and spelled[b" "] == 9
    assert spelled[b"A"] == 6  # the ordinary token wins over its byte-fallback twin <0x41>
    assert spelled[b"\xc3"] == 4 and spelled[b"\xa9"] == 5  # byte-fallback tokens stand for their byte
    assert spelled[b"<h1>"] == tok.convert_tokens_to_ids("<h1>")  # an ordinary added token: its literal text
    assert 0 not in spelled.values() and 1 not in spelled.values() and 2 not in spelled.values()  # controls


def test_byte_level_surfaces_are_the_bytes_of_the_alphabet():
    tok = byte_bpe([("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e")])
    spelled = surfaces(tok)
    assert spelled[b" the"] == tok.convert_tokens_to_ids("Ġthe")
    assert spelled[b"\xc3"] == tok.convert_tokens_to_ids("Ã")
    assert tok.eos_token_id not in spelled.values()


def test_shared_vocabulary_across_notations():
    tok_T, tok_S = metaspace_bpe(), byte_bpe([("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("t", "h"), ("th", "e")])
    ids_T, ids_S = shared_vocabulary(tok_T, tok_S, 5)
    pairs = dict(zip(ids_T.tolist(), tok_S.convert_ids_to_tokens(ids_S.tolist())))
    assert pairs[7] == "Ġthe" and pairs[8] == "the" and pairs[9] == "Ġ" and pairs[6] == "A"
    assert pairs[4] == "Ã" and pairs[5] == "©"  # the two bytes of 'é' on each side
    assert pairs[1] == EOS  # the EOS tokens pair: both end a document
    assert 0 not in pairs and 2 not in pairs and 3 not in pairs  # <unk>, <bos> and the losing twin <0x41>
    assert len(set(ids_S.tolist())) == len(ids_S)  # one-to-one


def test_verbatim_without_a_known_notation():
    from tokenizers import models as m
    from tokenizers import pre_tokenizers

    words = Tokenizer(m.WordLevel({"<unk>": 0, "Ġthe": 1, "cat": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>")
    assert surfaces(tok) == {"Ġthe".encode(): 1, b"cat": 2}
