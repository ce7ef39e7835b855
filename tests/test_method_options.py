"""Issue 11's method options, in process: the logit-matching map, unnormalised targets and the mse objective, the
layer-ablation hook, method.map / layer_balance validation, and method.preset resolution."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from semalign_ds import config as cfgmod
from semalign_ds.method import basis, objectives as obj
from semalign_ds.method.attribution import skip_layer


def _heads(V=40, D_T=10, D_S=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    W_T, W_S = torch.randn(V, D_T, **f64), torch.randn(V, D_S, **f64)
    g_T, g_S = 0.5 + torch.rand(D_T, **f64), 0.5 + torch.rand(D_S, **f64)
    return W_T, g_T, W_S, g_S


# ---- the logit-matching map (METHOD.md §8) ----

def test_logit_map_is_the_least_squares_solution():
    W_T, g_T, W_S, g_S = _heads()
    ids_T, ids_S = torch.arange(3, 40), torch.arange(0, 37).flip(0)  # a shared subset, in a different order
    M = basis.logit_matching_map(W_T, g_T, W_S, g_S, ids_T, ids_S, chunk=7)  # several vocabulary chunks
    A, B = W_S[ids_S] * g_S, W_T[ids_T] * g_T
    ref = torch.linalg.lstsq(A, B).solution  # argmin_M ||A M - B||_F
    assert M.shape == (6, 10) and M.dtype == torch.float64
    assert torch.allclose(M, ref, atol=1e-10)
    ones = basis.logit_matching_map(W_T, None, W_S, None, ids_T, ids_S)  # a norm without weight: g = 1
    assert torch.allclose(ones, torch.linalg.lstsq(W_S[ids_S], W_T[ids_T]).solution, atol=1e-10)


def test_mapped_state_reproduces_the_teachers_logits_when_the_student_head_can():
    """If the teacher's (gain-scaled) head factors through the student's, W_T diag(g_T) = W_S diag(g_S) P, then
    the student's logits on M h equal the teacher's logits on h for every h."""
    _, g_T, W_S, g_S = _heads(V=30, D_T=9, D_S=5, seed=1)
    P = torch.randn(5, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    W_T = (W_S * g_S) @ P / g_T
    ids = torch.arange(30)
    M = basis.logit_matching_map(W_T, g_T, W_S, g_S, ids, ids)
    h_T = torch.randn(4, 9, dtype=torch.float64)
    teacher_logits = (h_T * g_T) @ W_T.T
    student_logits = ((h_T @ M.T) * g_S) @ W_S.T
    assert torch.allclose(student_logits, teacher_logits, atol=1e-9)


def test_logit_map_refuses_bad_shapes():
    W_T, g_T, W_S, g_S = _heads()
    with pytest.raises(ValueError, match="equal-length"):
        basis.logit_matching_map(W_T, g_T, W_S, g_S, torch.arange(5), torch.arange(6))
    with pytest.raises(ValueError, match="gain of length D"):
        basis.logit_matching_map(W_T, g_S, W_S, g_S, torch.arange(5), torch.arange(5))


# ---- unnormalised targets and the mse objective ----

def test_align_without_normalisation_and_mse_objective():
    M = torch.randn(3, 5, dtype=torch.float64)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    assert torch.allclose(basis.align(M, x, normalise=False), x @ M.T)
    assert torch.allclose(basis.align(M, x), (x @ M.T) / x.norm(dim=-1, keepdim=True))
    rs, rt = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    ref = torch.stack([((rs[b, t] - rt[b, t]) ** 2).mean() for b in range(2) for t in range(4) if mask[b, t]]).mean()
    assert float(obj.mse_layer(rs, rt, mask)) == pytest.approx(float(ref), rel=1e-12)
    # why the target is not normalised: on unit vectors D * MSE = 2 - 2 cos, the cosine objective again
    us, ut = rs / rs.norm(dim=-1, keepdim=True), rt / rt.norm(dim=-1, keepdim=True)
    assert float(3 * obj.mse_layer(us, ut, mask)) == pytest.approx(2 * float(obj.cosine_layer(us, ut, mask)),
                                                                   rel=1e-9)


# ---- attribution by ablation: the hook ----

def _tiny_llama(layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


def test_skip_layer_equals_removing_the_layer():
    from semalign_ds.models.adapters import get_adapter

    model = _tiny_llama()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), skip_layer(get_adapter(model).layer(2)):
        ablated = model(input_ids=ids, use_cache=False).logits
    clean = model(input_ids=ids, use_cache=False).logits  # the hook is gone again
    del model.model.layers[1]
    removed = model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(ablated, removed, atol=1e-6) and not torch.allclose(clean, removed, atol=1e-3)


# ---- config: map, layer objective, balancing ----

@pytest.mark.parametrize("overrides, needle", [
    (["method.random_basis=true"], "replaced by method.map=random"),
    (["method.map=none", "method.layer_objective=cosine"], "'method.map'=none and 'method.layer_objective'=cosine"),
    (["method.map=none", "method.layer_objective=mse"], "set method.map to pinv, logit or random"),
    (["method.map=none", "method.layer_objective=fisher_logits"], "fisher_logits"),
    (["method.layer_objective=hidden_mse", "method.map=logit"], "set method.map=none or leave method.map unset"),
    (["method.map=logit", "method.basis=input"], "leave method.basis=output"),
    (["method.layer_balance=0"], "method.layer_balance=0 must be > 0"),
    (["method.layer_balance=0.5", "method.output_objective=none"], "no output term"),
    (["method.layer_balance=0.5", "method.w_out=0"], "no output term"),
    (["method.log_grad_cosine=true", "method.layer_objective=none"], "no layer term"),
    (["method.preset=paper_v3"], "'method.preset'"),
    (["pairing.attribution=shapley"], "'pairing.attribution'"),
])
def test_method_options_are_validated(overrides, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        cfgmod.config_from_dict({}, overrides)


def test_map_none_and_hidden_mse():
    assert cfgmod.config_from_dict({}).method.map == "pinv"
    assert cfgmod.config_from_dict({}, ["method.layer_objective=hidden_mse"]).method.map == "none"  # implied
    assert cfgmod.config_from_dict({"method": {"layer_objective": "hidden_mse", "map": "none"}}).method.map == "none"
    geometry = cfgmod.config_from_dict({}, ["method.map=none"])  # width-agnostic: allowed
    assert geometry.method.layer_objective == "relation_geometry"
    hashes = {cfgmod.result_hash(cfgmod.config_from_dict({}, [f"method.map={m}"]))
              for m in ("pinv", "logit", "random", "none")}
    assert len(hashes) == 4
    base = cfgmod.result_hash(cfgmod.config_from_dict({}))
    assert cfgmod.result_hash(cfgmod.config_from_dict({}, ["method.log_grad_cosine=true"])) == base  # watching only
    assert cfgmod.result_hash(cfgmod.config_from_dict({}, ["method.layer_balance=0.5"])) != base
    flat = cfgmod.flatten(cfgmod.config_from_dict({}, ["method.layer_balance=0.25", "pairing.attribution=ablation"]))
    assert flat["method.layer_balance"] == 0.25 and flat["pairing.attribution"] == "ablation"
    assert flat["method.map"] == "pinv" and flat["method.preset"] == "best" and "method.random_basis" not in flat


# ---- presets ----

def test_every_preset_is_complete_and_applies():
    for name, values in cfgmod.PRESETS.items():
        assert set(values) == set(cfgmod.PRESET_KEYS), name
        cfg = cfgmod.config_from_dict({}, [f"method.preset={name}"])
        assert all(cfgmod.get_dotted(cfg, k) == v for k, v in values.items()), name
    v1 = cfgmod.config_from_dict({}, ["method.preset=paper_v1"])
    assert (v1.method.layer_objective, v1.method.output_objective, v1.schedule.adapter, v1.schedule.lora_rank) == \
        ("cosine", "label_cosine", "lora", 16)
    v2 = cfgmod.config_from_dict({}, ["method.preset=paper_v2"])
    assert (v2.method.layer_objective, v2.method.output_objective, v2.method.w_label, v2.schedule.mode) == \
        ("relation_geometry", "kl", 0, "frontier")
    none = cfgmod.config_from_dict({}, ["method.preset=null"])  # no preset: the field defaults, best's values
    assert none.method.preset is None and none.schedule.mode == "full" and none.method.overrides == {}
    sft = cfgmod.config_from_dict({}, ["method.preset=sft"])  # CE counted once: no label term on top
    assert (sft.method.layer_objective, sft.method.output_objective, sft.method.w_label) == ("none", "ce", 0.0)
    kd, kd_ce = (cfgmod.config_from_dict({}, [f"method.preset={p}"]) for p in ("kd", "kd_ce"))
    assert (kd.method.output_objective, kd.method.w_label, kd_ce.method.w_label) == ("kl", 0.0, 1.0)
    assert cfgmod.config_from_dict({}, ["method.preset=hidden_mse"]).method.map == "none"


def test_field_defaults_are_the_default_presets_values():
    plain = cfgmod.RunConfig()
    assert plain.method.preset == cfgmod.DEFAULT_PRESET
    assert {k: cfgmod.get_dotted(plain, k) for k in cfgmod.PRESET_KEYS} == cfgmod.PRESETS[cfgmod.DEFAULT_PRESET]


def test_best_is_the_default_and_the_configuration_the_benchmark_chose_on_validation():
    """`best` = the row bench/quality/real.py chose on target validation (recorded in results/real/results.json),
    resolved from the benchmark's own overrides; and a config that says nothing gets it."""
    quality = Path(__file__).resolve().parent.parent / "bench" / "quality"
    sys.path.insert(0, str(quality))
    try:
        import methods
    finally:
        sys.path.remove(str(quality))
    results = json.loads((quality / "results" / "real" / "results.json").read_text())
    assert not results["dry"] and results["best"] in methods.REAL_METHODS
    chosen = cfgmod.config_from_dict({}, [*methods.REAL_BASE, *methods.REAL_METHODS[results["best"]].overrides])
    assert {k: cfgmod.get_dotted(chosen, k) for k in cfgmod.PRESET_KEYS} == cfgmod.PRESETS["best"]
    default = cfgmod.config_from_dict({})
    assert default.method.preset == "best"
    assert {k: cfgmod.get_dotted(default, k) for k in cfgmod.PRESET_KEYS} == cfgmod.PRESETS["best"]


def test_explicit_values_beat_the_preset_and_the_resolved_config_round_trips(tmp_path):
    raw = {"method": {"preset": "paper_v1", "w_out": 0.5}, "schedule": {"lora_rank": 8}}
    cfg = cfgmod.config_from_dict(raw, ["method.output_objective=kl"])
    m = cfg.method
    assert (m.layer_objective, m.output_objective, m.w_out, cfg.schedule.lora_rank, cfg.schedule.adapter) == \
        ("cosine", "kl", 0.5, 8, "lora")  # preset, override, file, file, preset
    saved = tmp_path / "config.yaml"
    saved.write_text(cfgmod.to_yaml(cfg))  # what a run saves: every resolved value and the preset's name
    assert yaml.safe_load(saved.read_text())["method"]["preset"] == "paper_v1"
    again = cfgmod.load_config(saved)
    assert again == cfg and cfgmod.result_hash(again) == cfgmod.result_hash(cfg)
    assert cfgmod.result_hash(cfg) != cfgmod.result_hash(cfgmod.config_from_dict({}, ["method.preset=paper_v1"]))


def test_packet_binding_tells_maps_and_target_normalisation_apart(tmp_path):
    """Packets emitted under one map or normalisation are refused under another (supervision.binding's method
    digest); student-side options (balancing) do not change the packets."""
    from types import SimpleNamespace

    from semalign_ds.run import supervision
    from semalign_ds.spec import MethodSpec

    blocks = SimpleNamespace(ids_NT=torch.zeros(2, 4, dtype=torch.long), mask_NT=torch.ones(2, 4, dtype=torch.bool),
                             cross=False)

    def method_digest(*overrides):
        cfg = cfgmod.config_from_dict({"teacher": {"path": str(tmp_path)}, "student": {"path": str(tmp_path)}},
                                      list(overrides))
        spec = SimpleNamespace(method=MethodSpec.from_config(cfg))
        return supervision.binding(SimpleNamespace(cfg=cfg, blocks=blocks, spec=spec))["method"]

    digests = [method_digest(f"method.map={m}") for m in ("pinv", "logit", "random")]
    digests += [method_digest("method.map=logit", "method.layer_objective=mse"),
                method_digest("method.map=random", "seed=1")]
    assert len(set(digests)) == len(digests)
    assert method_digest("method.layer_balance=0.5") == method_digest()
    assert method_digest("seed=1") == method_digest()  # the seed matters to the random map only
