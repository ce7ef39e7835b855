"""Bits per byte: the UTF-8 bytes each model's predicted tokens cover (student blocks, the teacher's own reading of
them, with and without a BOS token), checked against hand counts; and a BOS-reading teacher's blocks."""
from __future__ import annotations

import math

import numpy as np
import pytest
from tokenizers import processors

from semalign_ds import alignment
from semalign_ds.data import pack_sequences
from semalign_ds.evaluation.evaluate import _block_bytes, bits_per_byte
from test_cross_tokenizer import EOS, STUDENT_MERGES, TEACHER_MERGES, TEXT, byte_bpe


def bos_bpe(merges):
    """byte_bpe plus a BOS token that the tokenizer puts before every text (as Gemma's does)."""
    tok = byte_bpe(merges)
    tok.add_special_tokens({"bos_token": "<bos>"})
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    return tok


def token_bytes(tok, ids) -> list[int]:
    """Bytes of byte-level tokens: one per character of the token string, one for EOS (the separator)."""
    return [1 if t == EOS else len(t) for t in tok.convert_ids_to_tokens(ids)]


def test_prefix_bytes_counts_utf8_and_one_per_separator():
    assert alignment.prefix_bytes(["aé€😀", "xy"]).tolist() == [0, 1, 3, 6, 10, 11, 12, 13, 14]
    assert alignment.prefix_bytes(["ab", "cd", "ef"], upto=1).tolist() == [0, 1, 2, 3]  # only what is needed


def test_student_block_bytes_are_the_predicted_tokens_bytes():
    tok = byte_bpe(STUDENT_MERGES)
    texts = [TEXT, "x = 45 its", TEXT]
    stream = alignment.student_stream(texts, tok, tok.eos_token_id, None)
    got = alignment.student_block_bytes(texts, stream, 4)
    want = [sum(token_bytes(tok, stream.ids[lo + 1:lo + 4].tolist())) for lo in range(0, len(stream.ids), 4)]
    assert got.tolist() == want
    # every byte of the text and its separators is predicted once, except each block's first token
    firsts = sum(token_bytes(tok, stream.ids[::4].tolist()))
    assert got.sum() + firsts == sum(len(t.encode()) + 1 for t in texts)


def test_multibyte_characters_split_into_byte_tokens_count_once():
    tok = byte_bpe([])  # every UTF-8 byte its own token: é is 2 partial+full tokens, 日 three
    texts = ["aé 日本"]
    stream = alignment.student_stream(texts, tok, tok.eos_token_id, None)
    assert alignment.student_block_bytes(texts, stream, 64).tolist() == [len("é 日本".encode()) + 1]


def test_bos_teacher_reads_each_block_after_bos_and_predicts_all_of_it():
    tok_S, plain_T, bos_T = byte_bpe(STUDENT_MERGES), byte_bpe(TEACHER_MERGES), bos_bpe(TEACHER_MERGES)
    assert alignment.bos_prefix(plain_T) is None and alignment.bos_prefix(bos_T) == bos_T.bos_token_id
    plain = pack_sequences([TEXT], tok_S, seq_len=10, teacher_tokenizer=plain_T)
    bos = pack_sequences([TEXT], tok_S, seq_len=10, teacher_tokenizer=bos_T)
    row = bos.teacher_ids_NU[0][bos.teacher_mask_NU[0]].tolist()
    assert bos_T.convert_ids_to_tokens(row)[:3] == ["<bos>", "x", "Ġ="]
    assert row[1:] == plain.teacher_ids_NU[0][plain.teacher_mask_NU[0]].tolist()
    # the same teacher tokens, one position later; BOS (position 0) covers no character and is never aligned
    shifted = [a + 1 if a >= 0 else -1 for a in plain.align_NT[0].tolist()]
    assert bos.align_NT[0].tolist() == shifted and 0 not in shifted
    assert bos.exact_NT.equal(plain.exact_NT)
    stream = alignment.student_stream([TEXT], tok_S, tok_S.eos_token_id, None)
    total = len(TEXT.encode()) + 1
    with_bos = alignment.teacher_blocks([TEXT], stream, 10, bos_T, 0, bos_T.eos_token_id, None, None)
    without = alignment.teacher_blocks([TEXT], stream, 10, plain_T, 0, plain_T.eos_token_id, None, None)
    assert with_bos.teacher_bytes_N.tolist() == [total]  # from BOS: every character is predicted
    assert without.teacher_bytes_N.tolist() == [total - 1]  # its first token 'x' is given


def test_evaluation_byte_counts_for_both_models():
    tok_S, tok_T = byte_bpe(STUDENT_MERGES), byte_bpe(TEACHER_MERGES)
    texts = [TEXT, "45 digits = 123", TEXT]
    blocks = pack_sequences(texts, tok_S, 6, max_sequences=3, teacher_tokenizer=tok_T)
    s_bytes, t_bytes = _block_bytes(texts, blocks, tok_S, tok_T)
    for n in range(len(blocks)):
        s_ids = blocks.ids_NT[n][blocks.mask_NT[n]].tolist()
        t_ids = blocks.teacher_ids_NU[n][blocks.teacher_mask_NU[n]].tolist()
        assert s_bytes[n] == sum(token_bytes(tok_S, s_ids[1:]))
        assert t_bytes[n] == sum(token_bytes(tok_T, t_ids[1:]))
    same_s, same_t = _block_bytes(texts, pack_sequences(texts, tok_S, 6, max_sequences=3), tok_S)
    assert np.array_equal(same_s, s_bytes) and same_t is same_s


def test_bits_per_byte_formula_and_empty_text():
    assert bits_per_byte(math.log(2) * 12, 6) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no byte"):
        bits_per_byte(1.0, 0)


def test_teacher_columns_by_row_chunks_equal_one_forward_per_batch(monkeypatch):
    """The evaluation's teacher pass in chunks of rows (a 262k-vocabulary teacher: one row at a time) gives the
    same NLL and agreement as one forward per batch, across tokenizers."""
    from types import SimpleNamespace

    import torch
    import transformers

    from semalign_ds.evaluation import evaluate
    from semalign_ds.method.basis import shared_vocabulary
    from semalign_ds.models.adapters import get_adapter

    tok_S, tok_T = byte_bpe(STUDENT_MERGES), bos_bpe(TEACHER_MERGES)

    def llama(vocab, seed):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=64)).eval()

    teacher, student = llama(len(tok_T), 0), llama(len(tok_S), 1)
    fake = SimpleNamespace(adapter=get_adapter(teacher), forward_states=lambda ids, mask, layers, need_logits: (
        {}, teacher(input_ids=ids, attention_mask=mask.long()).logits))
    ids_T, ids_S = shared_vocabulary(tok_T, tok_S, 10)
    r = SimpleNamespace(teacher=fake, info=SimpleNamespace(device="cpu"),
                        vocab=SimpleNamespace(cross=True, ids_T=ids_T, ids_S=ids_S))
    blocks = pack_sequences([TEXT, "45 digits = 123", TEXT], tok_S, 6, teacher_tokenizer=tok_T)
    batches = [blocks.take(slice(0, 3)), blocks.take(slice(3, len(blocks)))]
    whole = evaluate._teacher_columns(r, {"s": student}, batches)
    monkeypatch.setattr(evaluate, "_LOGIT_BYTES", 1)
    rows = evaluate._teacher_columns(r, {"s": student}, batches)
    assert rows[0] == pytest.approx(whole[0], rel=1e-6) and rows[1] == pytest.approx(whole[1], rel=1e-6)
    assert rows[2]["s"] == pytest.approx(whole[2]["s"], rel=1e-5) and whole[2]["s"]["kl"] > 0
