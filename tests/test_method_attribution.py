"""Layer gradient x activation attribution (METHOD.md §3) against a finite-difference brute force."""
import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from semalign_ds.method.attribution import AttributionAccumulator, layer_grad_x_act


def _rms_norm_float64(self, x):
    """LlamaRMSNorm without its float32 upcast, so the finite differences below see float64 noise only."""
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      initializer_range=0.2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).double().eval()
    for mod in model.modules():
        if type(mod).__name__ == "LlamaRMSNorm":
            mod.forward = types.MethodType(_rms_norm_float64, mod)
    return model


def _state_modules(model):
    """h^(0) is the embedding output, h^(l) the output of decoder layer l."""
    return [model.model.embed_tokens, *model.model.layers]


def _loss(model, ids, mask):
    logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]
    labels = ids[:, 1:]
    valid = mask[:, 1:]
    return torch.nn.functional.cross_entropy(logits[valid], labels[valid])


def _capture(model, ids, mask):
    states, handles = {}, []
    for l, mod in enumerate(_state_modules(model)):
        handles.append(mod.register_forward_hook(lambda m, a, out, l=l: states.__setitem__(l, out)))
    try:
        loss = _loss(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    return states, loss


def _scaled_loss(model, ids, mask, layer, b, t, eps):
    """Loss with token (b, t) of h^(layer) scaled by (1 + eps): d/d eps at 0 equals g . h at that token."""
    def hook(mod, args, out):
        out = out.clone()
        out[b, t] = out[b, t] * (1 + eps)
        return out
    handle = _state_modules(model)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            return float(_loss(model, ids, mask))
    finally:
        handle.remove()


def _brute_force(model, ids, mask, eps=1e-5):
    L = len(model.model.layers)
    per_token = torch.zeros(L + 1, *ids.shape, dtype=torch.float64)
    for l in range(L + 1):
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                up = _scaled_loss(model, ids, mask, l, b, t, eps)
                down = _scaled_loss(model, ids, mask, l, b, t, -eps)
                per_token[l, b, t] = (up - down) / (2 * eps)
    m = mask.double()
    return (per_token.abs() * m).sum((1, 2)) / m.sum(), (per_token * m).sum((1, 2)) / m.sum()


def test_grad_x_act_equals_finite_differences():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    states, loss = _capture(model, ids, mask)
    abs_L, signed_L = layer_grad_x_act(states, loss, mask)
    ref_abs, ref_signed = _brute_force(model, ids, mask)
    assert abs_L.shape == (4,) and abs_L.dtype == torch.float32
    torch.testing.assert_close(abs_L.double(), ref_abs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(signed_L.double(), ref_signed, atol=1e-6, rtol=1e-5)
    assert (abs_L >= signed_L.abs() - 1e-7).all()


def test_accumulator_token_weighted_means():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, 64, (1, 6), generator=g), torch.tensor([[True] * 6])),
               (torch.randint(0, 64, (2, 6), generator=g), torch.tensor([[True] * 3 + [False] * 3, [True] * 6]))]
    acc = AttributionAccumulator(range(4))
    per_batch = []
    for ids, mask in batches:
        states, loss = _capture(model, ids, mask)
        per_batch.append((acc.update(states, loss, mask), int(mask.sum())))
    abs_mean, signed_mean = acc.means()
    expect = sum(s[0].double() * n for s, n in per_batch) / sum(n for _, n in per_batch)
    torch.testing.assert_close(abs_mean, expect)
    torch.testing.assert_close(signed_mean, sum(s[1].double() * n for s, n in per_batch) / 15)
    abs_d, _ = acc.scores_by_layer()
    assert sorted(abs_d) == [0, 1, 2, 3]


def test_unused_state_and_errors():
    h = torch.randn(1, 3, 4, requires_grad=True)
    other = torch.randn(1, 3, 4, requires_grad=True)
    abs_L, signed_L = layer_grad_x_act({1: h, 2: other}, (h ** 2).sum())
    torch.testing.assert_close(abs_L[0], (2 * h * h).sum(-1).abs().mean().detach())
    assert abs_L[1] == 0 and signed_L[1] == 0
    with pytest.raises(ValueError):
        layer_grad_x_act({}, h.sum())
    with pytest.raises(ValueError, match="no tokens"):
        AttributionAccumulator([1]).means()
