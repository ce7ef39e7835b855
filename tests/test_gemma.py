"""Gemma 3 (`gemma3_text`) through the family adapter, on tiny models built here: the (1 + weight) RMSNorm gain the
logit map uses, the sqrt(D) embedding scale in h^(0), soft-capped logits, the sliding/global layer kinds.
Shapes: ids_BT, hidden_BTD, logits_BTV.
"""
from __future__ import annotations

import math

import pytest
import torch
import transformers

from semalign_ds.method.basis import logit_matching_map
from semalign_ds.models.adapters import get_adapter
from semalign_ds.models.capture import capture_states

D, V, L = 32, 96, 3
TYPES = ["sliding_attention", "sliding_attention", "full_attention"]


def tiny_gemma(seed: int = 0, softcap: float | None = None) -> torch.nn.Module:
    """A tiny Gemma3ForCausalLM (tied head) whose RMSNorm weights are random, so 1 + w and w differ."""
    config = transformers.Gemma3TextConfig(
        vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, sliding_window=4, layer_types=TYPES,
        final_logit_softcapping=softcap, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return model


def _ids(seed: int = 1, B: int = 2, T: int = 10) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_adapter_rebuilds_gemma_logits_from_the_last_layer_state(softcap):
    model = tiny_gemma(softcap=softcap)
    adapter = get_adapter(model)
    assert adapter.family.norm_gain_offset == 1.0 and adapter.num_layers == L and adapter.hidden_size == D
    assert adapter.lm_head.weight.data_ptr() == adapter.embed.weight.data_ptr()  # tied head
    ids = _ids()
    with torch.no_grad(), capture_states(adapter, [L]) as states:
        logits = model(input_ids=ids).logits
    rebuilt = adapter.logits(states[L])
    assert torch.allclose(rebuilt, logits, atol=1e-5)
    if softcap is not None:
        assert float(logits.abs().max()) <= softcap  # the cap is the model's and the adapter applies it too
        assert not torch.allclose(adapter.lm_head(adapter.final_norm(states[L])), logits, atol=1e-3)


def test_final_norm_gain_is_one_plus_weight():
    model = tiny_gemma()
    adapter = get_adapter(model)
    h = torch.randn(2, 5, D)
    weight = adapter.final_norm.weight.detach()
    gain = adapter.norm_gain(weight)
    unit = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + adapter.final_norm.eps)
    assert torch.allclose(adapter.final_norm(h), unit * gain, atol=1e-5)
    assert not torch.allclose(adapter.final_norm(h), unit * weight, atol=1e-2)
    assert adapter.norm_gain(None) is None


def test_embedding_scale_is_in_h0():
    model = tiny_gemma()
    adapter = get_adapter(model)
    assert adapter.embed_scale == pytest.approx(math.sqrt(D), rel=1e-6)
    ids = _ids()
    with torch.no_grad(), capture_states(adapter, [0]) as states:
        model(input_ids=ids)
    assert torch.allclose(states[0], adapter.embed.weight[ids] * adapter.embed_scale, rtol=1e-3)


def test_layer_kinds_come_from_the_config():
    assert get_adapter(tiny_gemma()).layer_types == TYPES
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))
    assert get_adapter(llama).layer_types == ["full_attention"] * 2


def test_sliding_layers_see_only_their_window():
    """Layer 1 attends through a sliding window of 4: changing the first token leaves its output at the last of 12
    positions unchanged (and changes it at the first); the captured state is the layer's own output."""
    model = tiny_gemma()
    adapter = get_adapter(model)
    ids = _ids(T=12)
    changed = ids.clone()
    changed[:, 0] = (ids[:, 0] + 1) % V
    out = {}
    for name, x in (("ids", ids), ("changed", changed)):
        with torch.no_grad(), capture_states(adapter, [1]) as states:
            model(input_ids=x)
        out[name] = states[1]
    assert torch.allclose(out["ids"][:, -1], out["changed"][:, -1], atol=1e-6)  # layer 1 slides: 0 is out of view
    assert not torch.allclose(out["ids"][:, 0], out["changed"][:, 0])


def test_logit_map_with_gemma_gains_is_the_identity_for_an_equivalent_head():
    """A Llama student whose head equals the Gemma teacher's and whose final norm weight is 1 + the teacher's reads
    every state the same way; the logit map with the adapters' gains is then the identity (with the raw Gemma
    weight as the gain it is not)."""
    teacher = tiny_gemma()
    student = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        tie_word_embeddings=False)).eval()
    t, s = get_adapter(teacher), get_adapter(student)
    with torch.no_grad():
        s.lm_head.weight.copy_(t.lm_head.weight)
        s.final_norm.weight.copy_(t.norm_gain(t.final_norm.weight))
    h = torch.randn(1, 4, D)
    assert torch.allclose(s.logits(h), t.logits(h), atol=1e-4)
    ids = torch.arange(V)
    W = t.head_weight().detach()
    M = logit_matching_map(W, t.norm_gain(t.final_norm.weight.detach()), W, s.norm_gain(s.final_norm.weight.detach()),
                           ids, ids)
    assert torch.allclose(M, torch.eye(D, dtype=M.dtype), atol=1e-6)
    wrong = logit_matching_map(W, t.final_norm.weight.detach(), W, s.final_norm.weight.detach(), ids, ids)
    assert not torch.allclose(wrong, torch.eye(D, dtype=wrong.dtype), atol=1e-2)


@pytest.mark.slow
def test_zero3_gemma_teacher_matches_plain_forward(tmp_path):
    """The ZeRO-3 offload teacher on a 4-layer Gemma 3 (tied head, scaled embedding, sliding + global layers),
    partitioned over 2 gloo ranks: packets, gathered weights, the final-norm gain (1 + weight) and attribution equal
    a plain forward (tests/workers/teacher_worker.py)."""
    from workers.engines_common import run_workers

    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2, tie_word_embeddings=True)
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    model.save_pretrained(tmp_path / "model")
    results = run_workers("teacher_worker.py", 2, tmp_path / "out", ["--model", str(tmp_path / "model")])
    for rank, r in enumerate(results):
        assert r["teacher_partitioned"] and not r["teacher_requires_grad"]
        assert r["target_diff"] < 1e-5 and r["topk_idx_equal"] and r["topk_value_diff"] < 1e-5
        assert r["tail_diff"] < 1e-5 and r["full_logits_diff"] < 1e-5
        assert r["cross_target_diff"] < 1e-5 and r["cross_value_diff"] < 1e-5 and r["cross_masks"]
        assert r["head_diff"] == 0.0 and r["embed_diff"] == 0.0
        assert abs(r["gain_offset"] - 1.0) < 1e-6 and r["gain_offset_spread"] < 1e-6
        assert r["attr_abs_diff"] < 1e-8 and r["attr_signed_diff"] < 1e-8 and all(v > 0 for v in r["attr_abs"])
    assert results[0]["attr_abs"] == results[1]["attr_abs"]
