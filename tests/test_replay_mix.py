"""The data mix against forgetting: data.replay_fraction of the transfer set's sequences packed from
data.replay_path (same tokenizer and cross-tokenizer), and its input errors."""
from __future__ import annotations

import json

import pytest
import torch

from semalign_ds import config as cfgmod
from semalign_ds.data import pack_sequences, pack_transfer
from semalign_ds.run.checks import _replay_problems
from test_cross_tokenizer import STUDENT_MERGES, TEACHER_MERGES, byte_bpe

# the teacher reads ' digits' as one token (the student as two) and ' 12345' as six (the student as two): the
# replay blocks need ~6x the teacher positions of the transfer blocks
DOCS = [" digits" * 9, "x = digits" * 4] * 4
CODE = [" 12345" * 9, "x = 12345" * 4] * 6


def _files(tmp_path):
    for name, docs in (("docs.jsonl", DOCS), ("code.jsonl", CODE)):
        (tmp_path / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return tmp_path / "docs.jsonl", tmp_path / "code.jsonl"


def _data(tmp_path, **fields) -> cfgmod.DataConfig:
    docs, code = _files(tmp_path)
    return cfgmod.DataConfig(**{"path": str(docs), "seq_len": 8, "max_sequences": 8, **fields})


def test_a_quarter_of_the_sequences_come_from_the_replay_data(tmp_path):
    tok = byte_bpe(STUDENT_MERGES)
    data = _data(tmp_path, replay_path=str(tmp_path / "code.jsonl"), replay_fraction=0.25)
    blocks = pack_transfer(data, tok)
    main, replay = pack_sequences(DOCS, tok, 8, 6), pack_sequences(CODE, tok, 8, 2)
    assert len(blocks) == 8 and blocks.sample_ids_N.tolist() == list(range(8))
    assert torch.equal(blocks.ids_NT, torch.cat([main.ids_NT, replay.ids_NT]))
    assert torch.equal(blocks.mask_NT, torch.cat([main.mask_NT, replay.mask_NT]))
    assert torch.equal(pack_transfer(_data(tmp_path), tok).ids_NT, pack_sequences(DOCS, tok, 8, 8).ids_NT)


def test_cross_tokenizer_mix_pads_the_teacher_rows_to_one_width(tmp_path):
    tok_S, tok_T = byte_bpe(STUDENT_MERGES), byte_bpe(TEACHER_MERGES)
    data = _data(tmp_path, replay_path=str(tmp_path / "code.jsonl"), replay_fraction=0.5)
    blocks = pack_transfer(data, tok_S, tok_T)
    main = pack_sequences(DOCS, tok_S, 8, 4, teacher_tokenizer=tok_T)
    replay = pack_sequences(CODE, tok_S, 8, 4, teacher_tokenizer=tok_T)
    U = max(main.teacher_ids_NU.shape[1], replay.teacher_ids_NU.shape[1])
    assert blocks.teacher_ids_NU.shape == (8, U) and main.teacher_ids_NU.shape[1] != replay.teacher_ids_NU.shape[1]
    for got, part, rows in ((blocks.teacher_mask_NU[:4], main, main.teacher_mask_NU),
                            (blocks.teacher_mask_NU[4:], replay, replay.teacher_mask_NU)):
        width = rows.shape[1]
        assert torch.equal(got[:, :width], rows) and not got[:, width:].any()
    assert torch.equal(blocks.align_NT, torch.cat([main.align_NT, replay.align_NT]))
    assert torch.equal(blocks.teacher_ids_NU[4:, :replay.teacher_ids_NU.shape[1]], replay.teacher_ids_NU)


def test_too_little_replay_data_is_an_error(tmp_path):
    tok = byte_bpe(STUDENT_MERGES)
    (tmp_path / "small.jsonl").write_text(json.dumps({"text": "x = 1"}) + "\n")
    data = _data(tmp_path, replay_path=str(tmp_path / "small.jsonl"), replay_fraction=0.5)
    with pytest.raises(ValueError, match=r"data.replay_path=.*packs into 1 sequences .* needs 4"):
        pack_transfer(data, tok)
    with pytest.raises(ValueError, match="is no replay sequence"):
        pack_transfer(_data(tmp_path, max_sequences=2, replay_path=str(tmp_path / "code.jsonl"),
                            replay_fraction=0.1), tok)


@pytest.mark.parametrize("fields, message", [
    ({"replay_fraction": 1.0, "replay_path": "x"}, r"data.replay_fraction=1.0 must be < 1"),
    ({"replay_fraction": 0.2}, "needs data.replay_path"),
    ({"replay_path": "code.jsonl"}, "nothing would be mixed in"),
])
def test_replay_config_rules_name_the_keys(fields, message):
    with pytest.raises(ValueError, match=message):
        cfgmod.config_from_dict({"data": {"path": "unused", **fields}})


def test_replay_files_are_checked_with_the_paths():
    found: list[str] = []
    _replay_problems(found, cfgmod.DataConfig(path="unused", replay_fraction=0.2,
                                              replay_path="/nonexistent/replay.jsonl"))
    assert len(found) == 1 and "data.replay_path" in found[0]


def test_a_valid_mix_has_no_problem(tmp_path):
    found: list[str] = []
    _replay_problems(found, _data(tmp_path, replay_path=str(tmp_path / "code.jsonl"), replay_fraction=0.25))
    assert found == []


def test_a_cross_tokenizer_semalign_run_is_told_of_its_known_loss():
    from semalign_ds.run.caveats import known_losses

    best = cfgmod.config_from_dict({"teacher": {"path": "t"}, "student": {"path": "s"}}, [])
    sft = cfgmod.config_from_dict({"teacher": {"path": "t"}, "student": {"path": "s"}},
                                  ["method.layer_objective=none", "method.output_objective=ce"])
    (line,) = known_losses(best, cross=True)
    assert "closed less of the target gap than plain SFT" in line and "docs/RESULTS.md" in line
    assert known_losses(best, cross=False) == [] and known_losses(sft, cross=True) == []
