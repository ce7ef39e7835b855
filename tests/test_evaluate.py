"""Tests of semalign_ds.evaluation.evaluate on tiny Llama models built in the test (CPU, float32)."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from semalign_ds.evaluation.evaluate import format_table, perplexity, teacher_agreement

V = 48


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(0)


def ids(seed: int, b: int, t: int) -> torch.Tensor:
    return torch.randint(1, V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_perplexity_is_exp_of_mean_cross_entropy(model):
    ids_BT = ids(1, 3, 10)
    with torch.no_grad():
        logits_BTV = model(input_ids=ids_BT).logits
    ce = F.cross_entropy(logits_BTV[:, :-1].reshape(-1, V), ids_BT[:, 1:].reshape(-1))
    batches = [(ids_BT[:2], torch.ones(2, 10, dtype=torch.bool)), (ids_BT[2:], torch.ones(1, 10, dtype=torch.bool))]
    assert perplexity(model, batches, "cpu") == pytest.approx(math.exp(float(ce)), rel=1e-5)


def _padded(seqs, side: str):
    t = max(len(s) for s in seqs)
    ids_BT = torch.zeros(len(seqs), t, dtype=torch.long)
    mask_BT = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
        ids_BT[i, sl], mask_BT[i, sl] = s, True
    return ids_BT, mask_BT


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_does_not_change_perplexity(model, side):
    seqs = [ids(2, 1, 12)[0], ids(3, 1, 5)[0], ids(4, 1, 8)[0]]
    one_by_one = [(s[None], torch.ones(1, len(s), dtype=torch.bool)) for s in seqs]
    expected = perplexity(model, one_by_one, "cpu")
    ids_BT, mask_BT = _padded(seqs, side)
    ids_BT[~mask_BT] = 7  # arbitrary pad id: must not matter
    assert perplexity(model, [(ids_BT, mask_BT)], "cpu") == pytest.approx(expected, rel=1e-5)


def test_perplexity_without_valid_pairs_is_an_error(model):
    mask_BT = torch.zeros(2, 6, dtype=torch.bool)
    mask_BT[:, 0] = True  # one real token per row: no next-token pair
    with pytest.raises(ValueError, match="no pair"):
        perplexity(model, [(ids(5, 2, 6), mask_BT)], "cpu")


def test_perplexity_rejects_mismatched_shapes(model):
    with pytest.raises(ValueError, match="ids_BT, mask_BT"):
        perplexity(model, [(ids(5, 2, 6), torch.ones(2, 5, dtype=torch.bool))], "cpu")


def _logits_fn(m):
    return lambda ids_BT, mask_BT: m(input_ids=ids_BT, attention_mask=mask_BT.long()).logits


def test_agreement_of_a_model_with_itself(model):
    ids_BT, mask_BT = _padded([ids(6, 1, 9)[0], ids(7, 1, 4)[0]], "right")
    out = teacher_agreement(model, _logits_fn(model), [(ids_BT, mask_BT)], "cpu")
    assert out["kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["top1"] == 1.0


def test_agreement_with_another_model_matches_hand_computation(model):
    other = tiny_llama(1)
    ids_BT = ids(8, 2, 7)
    mask_BT = torch.ones(2, 7, dtype=torch.bool)
    mask_BT[1, 5:] = False
    out = teacher_agreement(model, _logits_fn(other), [(ids_BT, mask_BT)], "cpu")
    with torch.no_grad():
        zs = model(input_ids=ids_BT, attention_mask=mask_BT.long()).logits[mask_BT]
        zt = other(input_ids=ids_BT, attention_mask=mask_BT.long()).logits[mask_BT]
    kl = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="batchmean")
    top1 = (zs.argmax(-1) == zt.argmax(-1)).float().mean()
    assert out["kl"] == pytest.approx(float(kl), rel=1e-4) and out["kl"] > 0
    assert out["top1"] == pytest.approx(float(top1))


def test_agreement_rejects_vocab_mismatch(model):
    ids_BT = ids(9, 1, 5)
    bad = lambda i, m: torch.zeros(1, 5, V + 3)  # noqa: E731
    with pytest.raises(ValueError, match="share the vocabulary"):
        teacher_agreement(model, bad, [(ids_BT, torch.ones(1, 5, dtype=torch.bool))], "cpu")


def test_format_table_layout():
    rows = [{"model": "teacher", "ppl": 12.3456, "steps": 330},
            {"model": "student", "ppl": 23456.78, "steps": None}]
    text = format_table(rows, ["model", ("ppl", "perplexity"), "steps"]).splitlines()
    assert text[0].split("|")[1:4] == [" model   ", " perplexity ", " steps "]
    assert text[1] == "|---------|-----------:|------:|"
    assert text[2] == "| teacher |      12.35 |   330 |"
    assert text[3] == "| student |    23456.8 |       |"


def test_format_table_needs_columns():
    with pytest.raises(ValueError, match="columns"):
        format_table([{"a": 1}], [])
