"""Cross-tokenizer pieces without a model: the alignment rule on hand-checked strings, packing invariants, the
ULD objective against its definition, the schema-2 packet masks, and GGUF input errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from semalign_ds import alignment
from semalign_ds.data import pack_sequences
from semalign_ds.method.objectives import uld_topk
from semalign_ds.transport import schema
from semalign_ds.transport.packet import SupervisionPacket

EOS = "<|endoftext|>"


def byte_bpe(merges: list[tuple[str, str]]) -> PreTrainedTokenizerFast:
    """A byte-level BPE whose merges we choose, so every tokenization below can be written down by hand."""
    vocab = {EOS: 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


# the student merges digits ("Ġ123", "45"); the teacher splits them, as SmolLM2 does, and merges words
STUDENT_MERGES = [("Ġ", "1"), ("Ġ1", "2"), ("Ġ12", "3"), ("4", "5"), ("Ġ", "="), ("Ġ", "#"), ("Ġ", "d"),
                  ("Ġd", "i"), ("Ġdi", "g"), ("i", "t"), ("it", "s")]
TEACHER_MERGES = [("Ġ", "="), ("Ġ", "#"), ("Ġ", "d"), ("Ġd", "i"), ("Ġdi", "g"), ("Ġdig", "i"), ("Ġdigi", "t"),
                  ("Ġdigit", "s")]
TEXT = "x = 12345  # digits"


def tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_hand_checked_alignment():
    tok_S, tok_T = byte_bpe(STUDENT_MERGES), byte_bpe(TEACHER_MERGES)
    blocks = pack_sequences([TEXT], tok_S, seq_len=10, teacher_tokenizer=tok_T)
    s = tokens(tok_S, blocks.ids_NT[0].tolist())
    t = tokens(tok_T, blocks.teacher_ids_NU[0][blocks.teacher_mask_NU[0]].tolist())
    # student ends: x 1, Ġ= 3, Ġ123 7, 45 9, Ġ 10, Ġ# 12, Ġdig 16, its 19, EOS 20, pad
    assert s == ["x", "Ġ=", "Ġ123", "45", "Ġ", "Ġ#", "Ġdig", "its", EOS, EOS]
    # teacher ends: x 1, Ġ= 3, Ġ 4, 1 5, 2 6, 3 7, 4 8, 5 9, Ġ 10, Ġ# 12, Ġdigits 19, EOS 20
    assert t == ["x", "Ġ=", "Ġ", "1", "2", "3", "4", "5", "Ġ", "Ġ#", "Ġdigits", EOS]
    assert blocks.align_NT[0].tolist() == [0, 1, 5, 7, 8, 9, 9, 10, 11, -1]
    assert blocks.exact_NT[0].tolist() == [True, True, True, True, True, True, False, True, True, False]
    assert blocks.teacher_ids_NU.shape == (1, 16)  # 12 needed, rounded up to a multiple of 8


def test_partial_characters_and_block_cuts():
    """A character split into several byte tokens: only its last token is full; a block cut inside a document
    makes the teacher read from the cut, and the EOS separator aligns exactly."""
    tok_S, tok_T = byte_bpe([]), byte_bpe([("Ã", "©")])  # student: bytes; teacher: 'é' as one token
    blocks = pack_sequences(["aé b", "cd"], tok_S, seq_len=4, teacher_tokenizer=tok_T)
    # student stream: a | Ã © (é: partial, full) | Ġ b | EOS | c d | EOS  -> blocks of 4
    assert tokens(tok_S, blocks.ids_NT[0].tolist()) == ["a", "Ã", "©", "Ġ"]
    assert blocks.align_NT[0].tolist() == [0, 0, 1, 2] and blocks.exact_NT[0].tolist() == [True, False, True, True]
    second = tokens(tok_T, blocks.teacher_ids_NU[1][blocks.teacher_mask_NU[1]].tolist())
    assert second == ["b", EOS, "c", "d"]  # read from the cut: no context before the block
    assert blocks.align_NT[1].tolist() == [0, 1, 2, 3] and blocks.exact_NT[1].all()


def test_alignment_invariants_on_real_text(tiny_pair):
    from transformers import AutoTokenizer

    tok_S = AutoTokenizer.from_pretrained(tiny_pair["student"])
    tok_T = byte_bpe(TEACHER_MERGES)
    texts = [open(tiny_pair["train"]).read()[:3000] + " naïve café — 日本", "second doc 123"]
    blocks = pack_sequences(texts, tok_S, seq_len=32, teacher_tokenizer=tok_T)
    stream = alignment.student_stream(texts, tok_S, tok_S.eos_token_id, None)
    s_eff = alignment.effective_ends(stream.ends, stream.full, 0)
    assert torch.equal(blocks.ids_NT.reshape(-1)[:len(stream.ids)], torch.from_numpy(stream.ids))
    assert blocks.exact_NT.float().mean() > 0.3 and (blocks.align_NT[blocks.mask_NT] >= 0).float().mean() > 0.8
    bases = alignment.doc_bases(texts)
    for n in range(len(blocks)):
        lo = n * 32
        start = int(s_eff[lo - 1]) if lo else 0
        t_ids = blocks.teacher_ids_NU[n][blocks.teacher_mask_NU[n]].tolist()
        _, t_ends = alignment._teacher_block(alignment.block_pieces(texts, bases, start, int(s_eff[min(lo + 32,
                                             len(stream.ids)) - 1])), tok_T, tok_T.eos_token_id)
        t_ends = np.asarray(t_ends)
        t_full = alignment.full_flags(t_ends)
        assert len(t_ids) == len(t_ends)
        for t in range(32):
            if not blocks.mask_NT[n, t]:
                assert blocks.align_NT[n, t] == -1
                continue
            a, e = int(blocks.align_NT[n, t]), int(s_eff[lo + t])
            later = t_ends[t_full & (np.arange(len(t_ends)) > a)] if a >= 0 else t_ends[t_full]
            assert a < 0 or (t_full[a] and t_ends[a] <= e)  # a full teacher token, no look-ahead
            assert not len(later) or later.min() > e  # ... and the last such one
            assert bool(blocks.exact_NT[n, t]) == (a >= 0 and bool(stream.full[lo + t]) and t_ends[a] == stream.ends[lo + t])


def test_teacher_length_errors_and_same_tokenizer_path():
    tok_S, tok_T = byte_bpe(STUDENT_MERGES), byte_bpe([])
    with pytest.raises(ValueError, match=r"data.teacher_seq_len=8 is too short.*at least 20"):
        pack_sequences([TEXT], tok_S, seq_len=10, teacher_tokenizer=tok_T, teacher_seq_len=8)
    with pytest.raises(ValueError, match=r"more than its 16 positions; lower data.seq_len"):
        pack_sequences([TEXT], tok_S, seq_len=10, teacher_tokenizer=tok_T, teacher_max_positions=16)
    same = pack_sequences([TEXT], tok_S, seq_len=10)
    assert not same.cross and same.teacher_ids_NU is None
    cross = pack_sequences([TEXT], tok_S, seq_len=10, teacher_tokenizer=tok_T)
    assert torch.equal(same.ids_NT, cross.ids_NT) and torch.equal(same.mask_NT, cross.mask_NT)
    batch = cross.take(torch.tensor([0]))
    assert batch.align_BT.shape == (1, 10) and batch.rows(slice(0, 1)).teacher_ids_BU.shape == (1, 24)


def test_uld_equals_sorted_l1_and_bounds_it():
    gen = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 3, 7, generator=gen, requires_grad=True), torch.randn(2, 3, 11, generator=gen)
    p = torch.softmax(zt, -1).sort(-1, descending=True).values
    q = torch.nn.functional.pad(torch.softmax(zs, -1).sort(-1, descending=True).values, (0, 4))
    full = (p - q).abs().sum(-1).mean()
    from semalign_ds.method.objectives import teacher_topk

    values, _, tail = teacher_topk(zt, 11)
    assert torch.allclose(uld_topk(zs, values, tail), full, atol=1e-6)  # k = V_T: exactly the sorted L1
    values, _, tail = teacher_topk(zt, 3)
    loss = uld_topk(zs, values, tail)
    assert loss <= full + 1e-6 and loss > 0  # top-k + tail lower-bounds it
    loss.backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
    mask = torch.tensor([[True, False, False], [False, False, False]])
    assert torch.allclose(uld_topk(zs, values, tail, mask), uld_topk(zs[:1, :1], values[:1, :1], tail[:1, :1]))


def test_schema2_masks_round_trip_and_schema1_refused():
    B, T = 2, 3
    packet = SupervisionPacket(ids_BT=torch.zeros(B, T, dtype=torch.long), mask_BT=torch.ones(B, T, dtype=torch.bool),
                               sample_ids_B=torch.arange(B), top_values_BTK=torch.randn(B, T, 4),
                               tail_BT=torch.rand(B, T), state_mask_BT=torch.tensor([[1, 1, 0], [1, 0, 1]]).bool(),
                               out_mask_BT=torch.tensor([[1, 0, 0], [0, 0, 1]]).bool())
    flat = schema.packet_to_flat(packet)
    assert "top_idx" not in flat and flat["out_mask"].dtype == torch.bool
    back = schema.packet_from_flat(flat)
    assert torch.equal(back.output_mask_BT, packet.out_mask_BT) and torch.equal(back.layer_mask_BT,
                                                                                 packet.state_mask_BT)
    plain = schema.packet_from_flat({k: v for k, v in flat.items() if not k.endswith("_mask")})
    assert plain.state_mask_BT is None and plain.output_mask_BT is plain.mask_BT
    assert schema.SCHEMA_VERSION == 2
    with pytest.raises(ValueError, match=r"schema 1, this version reads schema 2.*rerun `semalign teach`"):
        schema.check_binding({"schema": "2"}, {"schema": "1"}, "the spool in 'x'", "write a new spool")


def test_gguf_input_errors(tmp_path):
    from semalign_ds.models.gguf import gguf_location

    with pytest.raises(ValueError, match=r"teacher.gguf_file='nope.gguf'.*is not a file"):
        gguf_location(tmp_path, "nope.gguf", "teacher")
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ValueError, match=r"is not a GGUF file"):
        gguf_location(tmp_path, "fake.gguf", "teacher")
    from semalign_ds.models.loading import load_config

    with pytest.raises(ValueError, match=r"holds GGUF files \(fake.gguf\); set teacher.gguf_file"):
        load_config(tmp_path, key="teacher.path")
