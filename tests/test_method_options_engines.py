"""Issue 11's method options in the engines, one rank in process: the gradient-balanced layer weight of a ZeRO-2
student stage, and attribution by ablation on a ZeRO-3 teacher."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from semalign_ds.method import objectives as obj

DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"




def _llama(layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=False)).eval()


def _packet():
    from semalign_ds.transport.packet import SupervisionPacket

    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    return SupervisionPacket(ids_BT=torch.randint(0, 64, (2, 6), generator=g), mask_BT=mask,
                             sample_ids_B=torch.arange(2), targets={2: torch.randn(2, 6, 16, generator=g)},
                             full_logits_BTV=3.0 * torch.randn(2, 6, 64, generator=g))


def _reference_gradients(model, packet):
    """The layer (relation geometry) and output (full KL) terms' gradients on layer 2's parameters, by hand."""
    from semalign_ds.models.adapters import get_adapter
    from semalign_ds.models.capture import capture_states

    model = copy.deepcopy(model)
    params = list(model.model.layers[1].parameters())
    for p in params:
        p.requires_grad_(True)
    with capture_states(get_adapter(model), {1, 2}) as states:
        logits = model(input_ids=packet.ids_BT, attention_mask=packet.mask_BT.long(), use_cache=False).logits
    layer = obj.relation_geometry(states[2] - states[1], packet.targets[2], packet.mask_BT)
    out = obj.kl_full(logits, packet.full_logits_BTV, packet.mask_BT)
    flat = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(t, params, retain_graph=True)]) for t in (layer, out)]
    return flat[0], flat[1], float(layer.detach()), float(out.detach())


def _one_step(model, objective):
    from semalign_ds.engines.ds_config import load_template, student_ds_config
    from semalign_ds.engines.student import StudentStage

    ds = student_ds_config(load_template(DS_CONFIGS / "student_zero2.json"), bf16=False, micro_batch=2, grad_accum=1,
                           world_size=1, grad_clip=1.0, hidden_size=16)
    stage = StudentStage(model, 2, ds_config=ds, lr=1e-2, warmup_steps=0, total_steps=4, weight_decay=0.0,
                         objective=objective)
    try:
        return stage.step(_packet())
    finally:
        stage.finish()


def test_balanced_layer_weight_holds_the_gradient_ratio(single_rank_env):
    from semalign_ds.engines.student import ObjectiveSpec

    base = _llama(3)
    g_layer, g_out, layer, out = _reference_gradients(base, _packet())
    cos = float(g_layer @ g_out / (g_layer.norm() * g_out.norm()))
    w_expected = 0.5 * 2.0 * float(g_out.norm() / g_layer.norm())  # fraction x ||w_out g_out|| / ||g_layer||

    balanced = copy.deepcopy(base)
    m = _one_step(balanced, ObjectiveSpec(w_label=0.0, w_out=2.0, layer_balance=0.5))
    assert m["w_layer_effective"] == pytest.approx(w_expected, rel=1e-4)
    assert m["grad_cos_layer_kl"] == pytest.approx(cos, abs=1e-5)
    assert m["loss"] == pytest.approx(2.0 * out + w_expected * layer, rel=1e-5)

    # the same step with that weight fixed moves the parameters identically: the two extra gradient passes left no
    # trace in the optimizer's gradients
    fixed = copy.deepcopy(base)
    plain = _one_step(fixed, ObjectiveSpec(w_label=0.0, w_out=2.0, w_layer=m["w_layer_effective"]))
    assert "w_layer_effective" not in plain and "grad_cos_layer_kl" not in plain
    layer2 = zip(balanced.model.layers[1].parameters(), base.model.layers[1].parameters())
    assert max(float((a - b).abs().max()) for a, b in layer2) > 1e-4
    for a, b in zip(balanced.parameters(), fixed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)

    measured = _one_step(copy.deepcopy(base), ObjectiveSpec(w_label=0.0, log_grad_cosine=True))
    assert measured["w_layer_effective"] == 1.0 and measured["grad_cos_layer_kl"] == pytest.approx(cos, abs=1e-5)


def _lm_loss(model, batches):
    total, n = 0.0, 0
    with torch.no_grad():
        for ids, mask in batches:
            logits = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
            valid = mask[:, :-1] & mask[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid],
                                                             reduction="sum"))
            n += int(valid.sum())
    return total / n


def test_attribution_by_ablation_on_a_zero3_teacher(single_rank_env):
    """score(l) = loss without layer l - clean loss, as removing the layer from a plain copy gives; a layer that
    adds nothing to the residual stream (its output projections zeroed) scores 0. The same engine emits mapped
    targets with and without the per-token normalisation (the mse objective's)."""
    from semalign_ds.engines.ds_config import load_template, teacher_ds_config
    from semalign_ds.engines.teacher import TeacherEngine
    from semalign_ds.method.targets import target_recipes
    from semalign_ds.models.adapters import get_adapter
    from semalign_ds.models.capture import capture_states

    model = _llama(4, seed=3)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randint(0, 64, (2, 8), generator=g), torch.ones(2, 8, dtype=torch.bool)) for _ in range(2)]
    batches[1][1][0, 5:] = False
    clean = _lm_loss(model, batches)
    reference = []
    for l in range(4):
        pruned = copy.deepcopy(model)
        del pruned.model.layers[l]
        reference.append(_lm_loss(pruned, batches) - clean)

    ids, mask = batches[1]
    with torch.no_grad(), capture_states(get_adapter(model), {1, 2}) as states:
        model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
    residual = states[2] - states[1]
    M = torch.randn(8, 16, generator=g)

    ds = teacher_ds_config(load_template(DS_CONFIGS / "teacher_zero3_offload_cpu.json"), offload="cpu", bf16=False,
                           micro_batch=2, world_size=1, device="cpu", hidden_size=16)
    teacher = TeacherEngine.wrap(model, ds)
    scores, clean_engine = teacher.attribute_by_ablation(batches, [1, 2, 3, 4])
    assert scores.dtype == torch.float64 and clean_engine == pytest.approx(clean, rel=1e-5)
    assert torch.allclose(scores, torch.tensor(reference, dtype=torch.float64), atol=1e-5)
    assert abs(float(scores[2])) < 1e-5 and max(abs(r) for r in reference) > 1e-3

    recipes = target_recipes([2], "layer")
    for normalise, want in ((False, residual @ M.T), (True, residual @ M.T / residual.norm(dim=-1, keepdim=True))):
        packet = teacher.emit(ids, mask, torch.arange(2), recipes, M, top_k=4, tau=1.0, need_logits=False,
                              target_dtype=torch.float32, normalise_targets=normalise)
        assert torch.allclose(packet.targets[1], want, atol=1e-5)


def test_ablation_and_norm_gain_on_two_zero3_ranks(tmp_path):
    """Two gloo ranks, each scoring its own batch: the all-reduced scores equal a plain model's over both batches,
    on both ranks; the gathered final-norm gain equals the plain weight (tests/workers/ablation_worker.py)."""
    from workers.engines_common import run_workers, tiny_llama

    model_dir = tmp_path / "model"
    tiny_llama(seed=5).save_pretrained(model_dir)
    results = run_workers("ablation_worker.py", 2, tmp_path / "out", ["--model", str(model_dir)])
    for r in results:
        assert r["scores"] == pytest.approx(r["reference"], abs=1e-5)
        assert r["clean"] == pytest.approx(r["clean_reference"], rel=1e-6) and r["gain_diff"] == 0.0
    assert results[0]["scores"] == results[1]["scores"]
