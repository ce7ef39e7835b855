"""The student's lean paths (issue 6): the memory-lean top-k KL equals objectives.kl_topk in value and gradient,
and a stage whose loss needs nothing above the frontier stops its forward there without changing the loss."""
from __future__ import annotations


import pytest
import torch

from semalign_ds.engines.kl_lean import kl_topk_lean
from semalign_ds.method import objectives as obj


def _case(seed: int, dtype=torch.float32, B=3, T=7, V=50, K=6):
    g = torch.Generator().manual_seed(seed)
    zs = (2.0 * torch.randn(B, T, V, generator=g)).to(dtype).requires_grad_(True)
    values, idx, tail = obj.teacher_topk(3.0 * torch.randn(B, T, V, generator=g), K, 1.5)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, :2] = False
    return zs, values, idx, tail, mask


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_kl_equals_kl_topk_value_and_gradient(tau, masked, dtype):
    zs, values, idx, tail, mask = _case(0, dtype)
    mask = mask if masked else None
    ref = obj.kl_topk(zs, values, idx, tail, mask, tau)
    (g_ref,) = torch.autograd.grad(ref, zs)
    lean = kl_topk_lean(zs, values, idx, tail, mask, tau, chunk=4)  # several row chunks
    (g_lean,) = torch.autograd.grad(lean, zs)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert lean.dtype == ref.dtype and float(abs(lean - ref)) < tol
    assert float((g_lean - g_ref).abs().max()) < tol
    if masked:
        assert float(g_lean[~mask].abs().max()) == 0.0  # padding gets no gradient


def test_lean_kl_without_real_tokens_is_a_zero_that_keeps_the_graph():
    zs, values, idx, tail, mask = _case(1)
    loss = kl_topk_lean(zs, values, idx, tail, torch.zeros_like(mask), 1.0)
    loss.backward()
    assert float(loss) == 0.0 and float(zs.grad.abs().max()) == 0.0


def test_layer_only_stage_stops_after_the_frontier(tmp_path, single_rank_env):
    """A layer-only stage (w_out = w_label = 0) never runs the layers above k or the head, and its loss equals the
    loss of the full forward."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from semalign_ds.engines.ds_config import load_template, student_ds_config
    from semalign_ds.engines.student import ObjectiveSpec, StudentStage
    from transformers import LlamaConfig, LlamaForCausalLM
    from semalign_ds.transport.packet import SupervisionPacket
    from pathlib import Path

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    ds = student_ds_config(load_template(Path(__file__).resolve().parents[1] / "ds_configs" / "student_zero2.json"),
                           bf16=False, micro_batch=2, grad_accum=1, world_size=1, grad_clip=1.0, hidden_size=16)
    g = torch.Generator().manual_seed(1)
    packet = SupervisionPacket(ids_BT=torch.randint(0, 64, (2, 5), generator=g),
                               mask_BT=torch.ones(2, 5, dtype=torch.bool), sample_ids_B=torch.arange(2),
                               targets={2: torch.randn(2, 5, 16, generator=g)})
    calls = []
    handles = [model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i in range(3)]
    handles.append(model.lm_head.register_forward_hook(lambda m, a, o: calls.append("head")))
    stage = StudentStage(model, 2, ds_config=ds, lr=0.0, warmup_steps=0, total_steps=2, weight_decay=0.0,
                         objective=ObjectiveSpec(w_out=0.0))
    try:
        lean = stage.step(packet)["layer_loss"]
        assert calls == [0, 1]  # layers 1 and 2 (0-based 0, 1); never layer 3 or the head
        with torch.no_grad(), __import__("semalign_ds.models.capture", fromlist=["x"]).capture_states(
                stage.adapter, {1, 2}) as states:
            model(input_ids=packet.ids_BT, attention_mask=packet.mask_BT.long(), use_cache=False)
        full = obj.relation_geometry(states[2] - states[1], packet.targets[2], packet.mask_BT)
        assert lean == pytest.approx(float(full), rel=1e-6)
    finally:
        stage.finish()
        for h in handles:
            h.remove()
