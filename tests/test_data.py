"""Transfer data: reading JSONL/text/parquet through `datasets`, the user errors, packing, and the
deterministic, resumable, rank-sharded batching. Shapes: ids_NT/mask_NT packed blocks, ids_BT/mask_BT batches.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from semalign_ds.data import (TokenBlocks, check_seq_len, load_texts, micro_batch_ids, micro_batches_per_epoch,
                              owned_samples, pack_sequences, take)

WORDS = ["<unk>", "<eos>", "<pad>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far"]
DOCS = ["the cat sat on a mat", "a dog ran far", "the dog sat", "cat", "the mat ran on a far dog cat"]


@pytest.fixture(scope="module")
def tokenizer():
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def blocks_of(n: int, seq_len: int = 3) -> TokenBlocks:
    ids_NT = torch.arange(n * seq_len, dtype=torch.int64).view(n, seq_len)
    return TokenBlocks(ids_NT, torch.ones(n, seq_len, dtype=torch.bool), torch.arange(n, dtype=torch.int64))


# ---------------------------------------------------------------- reading


def test_jsonl_with_custom_field(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"body": d, "id": i} for i, d in enumerate(DOCS)] + [{"body": ""}])
    spec = {"path": str(tmp_path / "d.jsonl"), "format": "auto", "text_field": "body"}
    assert load_texts(spec, cache_dir=tmp_path / "cache") == DOCS  # the empty document is dropped


def test_text_files_one_document_per_file_from_a_directory(tmp_path):
    for i, doc in enumerate(DOCS[:3]):
        (tmp_path / f"{i}.txt").write_text(doc + "\nsecond line\n", encoding="utf-8")
    (tmp_path / "notes.bin").write_bytes(b"\x00\xff ignored: not a text extension")
    texts = load_texts({"path": str(tmp_path), "format": "text"})
    assert texts == [d + "\nsecond line\n" for d in DOCS[:3]]


def test_parquet_and_glob(tmp_path):
    for part in (0, 1):
        table = pa.table({"text": DOCS[part * 2:part * 2 + 2], "n": [1, 2]})
        pq.write_table(table, tmp_path / f"part-{part}.parquet")
    spec = {"path": str(tmp_path / "part-*.parquet"), "format": "auto", "text_field": "text"}
    assert load_texts(spec) == DOCS[:4]


def test_spec_may_be_an_object(tmp_path):
    class Spec:
        path, format, text_field = str(write_jsonl(tmp_path / "d.jsonl", [{"text": "a dog"}])), "jsonl", "text"
    assert load_texts(Spec()) == ["a dog"]


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path=.*matches no file"):
        load_texts({"path": str(tmp_path / "absent.jsonl")})


def test_empty_file_is_reported_as_empty(tmp_path):
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.path=.*the data is empty"):
        load_texts({"path": str(tmp_path / "empty.jsonl")})
    write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": None}])
    with pytest.raises(ValueError, match=r"the data is empty \(no non-empty documents\)"):
        load_texts({"path": str(tmp_path / "blank.jsonl")})


def test_missing_field_names_the_available_columns(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"body": "a", "title": "b"}])
    with pytest.raises(ValueError, match=r"text_field='text'.*available columns: \['body', 'title'\]"):
        load_texts({"path": str(tmp_path / "d.jsonl"), "text_field": "text"})


def test_non_text_field_is_refused(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": 3}, {"text": 4}])
    with pytest.raises(ValueError, match=r"row 0 holds int, not text"):
        load_texts({"path": str(tmp_path / "d.jsonl")})


def test_unreadable_file_is_named(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}])
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"cannot read .*b\.jsonl as json"):
        load_texts({"path": str(tmp_path / "*.jsonl")})


def test_format_errors(tmp_path):
    (tmp_path / "d.csv").write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.path: the format of .*d\.csv cannot be told.*set data\.format to"):
        load_texts({"path": str(tmp_path / "d.csv")})
    with pytest.raises(ValueError, match=r"data\.format='csv' is not one of"):
        load_texts({"path": str(tmp_path / "d.csv"), "format": "csv"})
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    (tmp_path / "d.txt").write_text("b", encoding="utf-8")
    with pytest.raises(ValueError, match=r"mixes formats"):
        load_texts({"path": str(tmp_path / "d.*[lt]")})


# ---------------------------------------------------------------- packing


def test_packing_round_trips_the_token_stream(tokenizer):
    blocks = pack_sequences(DOCS, tokenizer, seq_len=4, max_sequences=None)
    expected = [t for d in DOCS for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [1]]
    assert blocks.ids_NT.dtype == torch.int64 and blocks.mask_NT.dtype == torch.bool
    assert blocks.ids_NT.shape == (-(-len(expected) // 4), 4) and blocks.seq_len == 4
    assert blocks.ids_NT[blocks.mask_NT].tolist() == expected
    pad = blocks.ids_NT.flatten()[len(expected):]
    assert (pad == tokenizer.pad_token_id).all() and not blocks.mask_NT.flatten()[len(expected):].any()
    assert blocks.mask_NT.flatten()[:len(expected)].all()  # padding only at the very end
    assert torch.equal(blocks.sample_ids_N, torch.arange(len(blocks)))


def test_packing_is_deterministic_and_capped(tokenizer):
    full = pack_sequences(DOCS, tokenizer, seq_len=4)
    capped = pack_sequences(DOCS, tokenizer, seq_len=4, max_sequences=2)
    again = pack_sequences(DOCS, tokenizer, seq_len=4, max_sequences=2)
    assert len(capped) == 2 and capped.mask_NT.all()
    assert torch.equal(capped.ids_NT, full.ids_NT[:2]) and torch.equal(capped.ids_NT, again.ids_NT)


def test_packing_without_eos(tokenizer):
    blocks = pack_sequences(["cat dog", "mat"], tokenizer, seq_len=8, eos=False)
    assert blocks.ids_NT[blocks.mask_NT].tolist() == [4, 9, 8]


def test_packing_errors(tokenizer):
    with pytest.raises(ValueError, match=r"data\.seq_len=0"):
        pack_sequences(DOCS, tokenizer, seq_len=0)
    with pytest.raises(ValueError, match=r"produced no tokens"):
        pack_sequences([], tokenizer, seq_len=4, eos=False)


def test_seq_len_over_a_model_limit_names_key_and_model():
    student = transformers.LlamaConfig(max_position_embeddings=64)
    teacher = transformers.GPT2Config(n_positions=32)
    check_seq_len(32, student, teacher)
    with pytest.raises(ValueError, match=r"data\.seq_len=48 exceeds the 32 positions of the gpt2 model"):
        check_seq_len(48, student, teacher)
    with pytest.raises(ValueError, match=r"data\.seq_len=0"):
        check_seq_len(0, student)


# ---------------------------------------------------------------- batching


def test_each_rank_draws_only_its_own_samples_and_covers_them_in_an_epoch():
    N, micro, world = 23, 3, 2
    per_epoch = micro_batches_per_epoch(N, micro, world)
    assert per_epoch == 3  # 11 per rank -> 3 micro-batches of 3
    for rank in range(world):
        epoch0 = torch.cat([micro_batch_ids(N, micro, world, rank, 5, i) for i in range(per_epoch)])
        assert len(set(epoch0.tolist())) == 9 and all(i % world == rank for i in epoch0.tolist())
        again = torch.cat([micro_batch_ids(N, micro, world, rank, 5, i) for i in range(per_epoch)])
        assert torch.equal(epoch0, again)  # a pure function of (seed, index): resume recomputes it
        epoch1 = torch.cat([micro_batch_ids(N, micro, world, rank, 5, per_epoch + i) for i in range(per_epoch)])
        assert not torch.equal(epoch0, epoch1)  # a fresh permutation each epoch
    ranks = [set(owned_samples(N, r, world).tolist()) for r in range(world)]
    assert ranks[0] | ranks[1] == set(range(N)) and not ranks[0] & ranks[1]


def test_other_seeds_give_other_orders_and_take_keeps_the_order():
    a = micro_batch_ids(40, 4, 1, 0, seed=1, index=0)
    b = micro_batch_ids(40, 4, 1, 0, seed=2, index=0)
    assert not torch.equal(a, b)
    blocks = blocks_of(40)
    batch = take(blocks, a)
    assert torch.equal(batch.sample_ids_B, a) and torch.equal(batch.ids_BT, blocks.ids_NT[a])


def test_batching_errors():
    with pytest.raises(ValueError, match="fewer than one micro-batch of 4"):
        micro_batches_per_epoch(7, 4, 2)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        owned_samples(10, 2, 2)
    with pytest.raises(ValueError, match="must be >= 0"):
        micro_batch_ids(10, 2, 1, 0, 0, -1)
