"""Issue 11's method options through one `semalign run` on the tiny pair: the logit-matching map, the mse layer
objective, the gradient-balanced layer weight and pairing by ablation, together."""
from __future__ import annotations

import json

import pytest


def test_logit_map_mse_balance_and_ablation_in_one_run(tmp_path, tiny_pair):
    from test_pipeline import semalign, write_config

    cfg = write_config(tmp_path, tiny_pair)
    semalign("run", "--config", cfg, "method.map=logit", "method.layer_objective=mse", "method.layer_balance=0.5",
             "pairing.attribution=ablation", "pairing.attribution_batches=2", "schedule.epochs_per_stage=0.25")
    run = tmp_path / "run"

    pairing = json.loads((run / "pairing.json").read_text())
    scores = pairing["scores_abs"]
    assert pairing["meta"]["attribution"] == "ablation" and pairing["scores_signed"] is None
    assert len(scores) == 4 and pairing["meta"]["clean_loss"] > 0
    assert pairing["critical_layer"] == 1 + max(range(4), key=lambda i: scores[i])

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("semalign").experiment_id])
    params = mlrun.data.params
    assert (params["method.map"], params["method.layer_objective"], params["method.layer_balance"],
            params["pairing.attribution"]) == ("logit", "mse", "0.5", "ablation")
    assert "map=logit" in mlrun.info.run_name
    steps = int(params["plan.steps_per_stage"]) * 2  # two student layers
    weights = client.get_metric_history(mlrun.info.run_id, "w_layer_effective")
    cosines = client.get_metric_history(mlrun.info.run_id, "grad_cos_layer_kl")
    assert [m.step for m in weights] == list(range(1, steps + 1)) == [m.step for m in cosines]
    assert all(m.value > 0 for m in weights) and all(-1.0 <= m.value <= 1.0 for m in cosines)
    assert len({round(m.value, 9) for m in weights}) > 1  # set per step from the gradients, not a constant
    # L_T + 1 = 5 forwards per attribution sample: 2 batches x 4 sequences of 48, 5 times
    assert mlrun.data.metrics["teacher_attribution_passes_per_sample"] == pytest.approx(2 * 4 / 48 * 5)
    assert mlrun.info.status == "FINISHED"
