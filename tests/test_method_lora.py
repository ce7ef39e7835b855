"""LoRA adapters (PEFT) on the frontier layer: wrapping, training flags, merging (METHOD.md §6)."""
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from semalign_ds.method.lora import add_lora, merge_lora


def _randomise_B(params):
    """add_lora returns (A, B) per wrapped module; B starts at zero, so give it values to merge."""
    with torch.no_grad():
        for B in params[1::2]:
            assert B.abs().sum() == 0
            B.normal_(0, 0.1)


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(cfg).eval()


def test_an_adapter_starts_as_no_update_and_freezes_its_base():
    holder = nn.Sequential(nn.Linear(6, 4))
    x = torch.randn(3, 6)
    before = holder(x)
    params = add_lora(holder, ["0"], rank=2, alpha=4.0)
    torch.testing.assert_close(holder(x), before)
    A, B = params
    assert A.shape == (2, 6) and B.shape == (4, 2) and B.abs().sum() == 0 and A.abs().sum() > 0
    base = holder[0].get_base_layer()
    assert not base.weight.requires_grad and not base.bias.requires_grad and A.requires_grad and B.requires_grad


def test_llama_layer_merge_equals_unmerged_and_keys_unchanged():
    model = _tiny_llama()
    layer = model.model.layers[1]
    keys_before = list(model.state_dict().keys())
    grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    params = add_lora(layer, ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], rank=4, alpha=8)
    assert len(params) == 10 and all(p.requires_grad for p in params)
    assert layer.self_attn.k_proj.__class__ is nn.Linear  # not a target
    _randomise_B(params)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
    merge_lora(model)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict().keys()) == keys_before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grad_before


def test_gpt2_conv1d_merge():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16)).eval()
    keys_before = list(model.state_dict().keys())
    params = add_lora(model.transformer.h[0], ["c_attn", "c_proj"], rank=2, alpha=2)
    assert len(params) == 6  # attn.c_attn, attn.c_proj, mlp.c_proj
    assert params[0].shape == (2, 16) and params[1].shape == (48, 2)  # A: r x in, B: out x r
    _randomise_B(params)
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        merge_lora(model)
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict().keys()) == keys_before


def test_lora_trains_only_adapter_and_bf16():
    base = nn.Linear(5, 3).to(torch.bfloat16)
    w0 = base.weight.detach().clone()
    holder = nn.Sequential(base)
    params = add_lora(holder, ["0"], rank=2, alpha=2)
    opt = torch.optim.SGD(params, lr=0.1)
    loss = holder(torch.randn(4, 5, dtype=torch.bfloat16)).float().pow(2).sum()
    loss.backward()
    opt.step()
    assert base.weight.grad is None and torch.equal(base.weight, w0)
    assert params[1].abs().sum() > 0  # B moved
    merged = merge_lora(holder)
    assert isinstance(merged[0], nn.Linear) and merged[0].weight.dtype == torch.bfloat16
    assert not torch.equal(merged[0].weight, w0)


def test_errors_and_idempotent_wrapping():
    layer = _tiny_llama().model.layers[0]
    with pytest.raises(ValueError, match=r"schedule\.lora_targets"):
        add_lora(layer, ["not_a_proj"], rank=2, alpha=2)
    add_lora(layer, ["q_proj"], rank=2, alpha=2)
    with pytest.raises(ValueError, match=r"schedule\.lora_targets"):
        add_lora(layer, ["q_proj"], rank=2, alpha=2)  # already wrapped: nothing new to match
    with pytest.raises(ValueError, match="lora_rank"):
        add_lora(nn.Sequential(nn.Linear(3, 3)), ["0"], rank=0, alpha=1)
