"""The config tree: strict YAML, dotted overrides, clear errors, every shipped config loads."""
from pathlib import Path

import pytest

from semalign_ds import config as cfgmod

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = cfgmod.load_config(path)
    assert cfg.name
    again = cfgmod.config_from_dict(cfgmod.to_dict(cfg))
    assert cfgmod.result_hash(again) == cfgmod.result_hash(cfg)


def test_defaults_follow_method_md():
    cfg = cfgmod.RunConfig()
    m = cfg.method
    assert (m.basis, m.residual, m.layer_objective, m.output_objective) == ("output", "layer", "relation_geometry", "kl")
    assert (m.top_k, m.tau, m.w_layer, m.w_out, m.w_label) == (64, 1.0, 1.0, 1.0, 1.0)  # w_label: docs/RESULTS.md
    assert cfg.teacher.trust_remote_code is False and cfg.teacher_engine.offload == "cpu"


def test_dotted_overrides_parse_values(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("schedule: {epochs_per_stage: 10}\n")
    cfg = cfgmod.load_config(f, ["schedule.epochs_per_stage=2", "schedule.stages=[1, 3]", "method.tau=2",
                                 "pairing.manual=null"])
    assert cfg.schedule.epochs_per_stage == 2.0 and cfg.schedule.stages == [1, 3]
    assert cfg.method.tau == 2.0 and isinstance(cfg.method.tau, float)


@pytest.mark.parametrize("raw, overrides, needle", [
    ({"schedule": {"step_per_stage": 3}}, [], "schedule.step_per_stage"),
    ({"bogus": 1}, [], "'bogus'"),
    ({}, ["schedule.epochs_per_stage=abc"], "schedule.epochs_per_stage"),
    ({"schedule": {"steps_per_stage": 3}}, [], "was replaced by schedule.epochs_per_stage"),
    ({}, ["transport.epochs=2"], "nothing is capped"),
    ({}, ["schedule.epochs_per_stage=0"], "schedule.epochs_per_stage"),
    ({}, ["method.basis=svd"], "method.basis"),
    ({}, ["data.seq_len=0"], "data.seq_len"),
    ({}, ["schedule.stages=[]"], "schedule.stages"),
    ({"teacher": "x"}, [], "teacher"),
    ({}, ["schedule"], "section.key=value"),
])
def test_bad_config_names_the_key(raw, overrides, needle):
    with pytest.raises(ValueError) as err:
        cfgmod.config_from_dict(raw, overrides)
    assert needle in str(err.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        cfgmod.load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        cfgmod.load_config(bad)


def test_result_hash_ignores_watching_fields_only():
    base = cfgmod.config_from_dict({})
    watched = cfgmod.config_from_dict({}, ["runtime.progress=false", "tracking.enabled=false", "name=x"])
    changed = cfgmod.config_from_dict({}, ["method.top_k=8"])
    assert cfgmod.result_hash(base) == cfgmod.result_hash(watched)
    assert cfgmod.result_hash(base) != cfgmod.result_hash(changed)


# ---- presets: complete, recorded, switchable ----

def test_switching_the_preset_of_a_resolved_config_switches_every_value(tmp_path, capsys):
    from semalign_ds import cli

    saved = tmp_path / "resolved.yaml"
    assert cli.main(["config", "--config", str(ROOT / "configs" / "demo.yaml")]) == 0
    saved.write_text(capsys.readouterr().out)  # what `semalign config` prints: preset best, fully resolved
    assert cfgmod.load_config(saved) == cfgmod.load_config(ROOT / "configs" / "demo.yaml")  # reloads to itself
    assert cli.main(["config", "--config", str(saved), "method.preset=paper_v1"]) == 0
    v1 = cfgmod.config_from_dict(__import__("yaml").safe_load(capsys.readouterr().out))
    assert (v1.method.layer_objective, v1.method.output_objective, v1.schedule.mode) == \
        ("cosine", "label_cosine", "frontier")
    assert v1.method.preset == "paper_v1" and v1.method.overrides == {}
    assert cfgmod.flatten(v1)["method.overrides"] == "none" and cfgmod.flatten(v1)["method.preset"] == "paper_v1"


def test_keys_set_on_top_of_a_preset_are_recorded_as_overrides_and_survive_a_switch():
    cfg = cfgmod.config_from_dict({"method": {"w_label": 0.5, "top_k": 64}})  # top_k = best's: not an override
    assert cfg.method.overrides == {"method.w_label": 0.5}
    assert cfgmod.flatten(cfg)["method.overrides"] == "method.w_label=0.5"
    reloaded = cfgmod.config_from_dict(cfgmod.to_dict(cfg))
    assert reloaded == cfg
    switched = cfgmod.config_from_dict(cfgmod.to_dict(cfg), ["method.preset=paper_v2"])
    assert (switched.method.w_label, switched.schedule.mode, switched.method.overrides) == \
        (0.5, "frontier", {"method.w_label": 0.5})
    hand_written = cfgmod.config_from_dict({"method": {"preset": "kd", "overrides": {"method.w_label": 9}}})
    assert hand_written.method.overrides == {} and hand_written.method.w_label == 0.0  # a record, not a setting


def test_unknown_keys_name_the_nearest_valid_key_and_values_their_range():
    with pytest.raises(ValueError, match=r"unknown config key 'schedule.grad_clipping'; did you mean "
                                         r"'schedule.grad_clip'\?"):
        cfgmod.config_from_dict({}, ["schedule.grad_clipping=1"])
    with pytest.raises(ValueError, match=r"data.micro_batch_size=0 must be >= 1 \(Sequences per rank per "
                                         r"micro-step\)"):
        cfgmod.config_from_dict({}, ["data.micro_batch_size=0"])
    with pytest.raises(ValueError, match="no loss term is active"):
        cfgmod.config_from_dict({}, ["method.w_layer=0", "method.w_out=0", "method.w_label=0"])


def test_lm_eval_limit_takes_a_count_or_a_fraction():
    assert cfgmod.config_from_dict({}, ["eval.lm_eval.limit=0.5"]).eval.lm_eval.limit == 0.5
    count = cfgmod.config_from_dict({}, ["eval.lm_eval.limit=100"]).eval.lm_eval.limit
    assert count == 100 and isinstance(count, int)
    with pytest.raises(ValueError, match="whole number of documents"):
        cfgmod.config_from_dict({}, ["eval.lm_eval.limit=2.5"])


def test_value_problems_are_returned_for_the_check_pass_with_the_config():
    cfg, problems = cfgmod.parse({}, ["schedule.lr=-1", "schedule.grad_clip=-1", "data.seq_len=64"])
    assert [p.split("=")[0] for p in problems] == ["schedule.lr", "schedule.grad_clip"]
    assert cfg.data.seq_len == 64 and cfg.schedule.lr == cfgmod.ScheduleConfig().lr  # the bad ones reset


def test_the_json_schema_documents_every_field(capsys):
    from semalign_ds import cli

    assert cli.main(["config", "--schema"]) == 0
    schema = __import__("json").loads(capsys.readouterr().out)
    method = schema["$defs"]["MethodConfig"]["properties"]
    assert method["top_k"]["minimum"] == 0 and method["w_label"]["description"].startswith("Weight of")
    assert schema["$defs"]["ScheduleConfig"]["additionalProperties"] is False
    assert all(p.get("description") for d in schema["$defs"].values() for p in d["properties"].values())
