"""One benchmark worker: runs a list of transfer runs in this process through `semalign_ds.run.pipeline.run`.

Usage (the driver starts it): python bench/quality/worker.py JOB.json
JOB.json: {"specs": [spec...], "pairs": {name: paths}, "base_overrides": [...], "eval_sequences": n,
           "mlflow_uri": "sqlite:///...", "experiment": "...", "keep_models": false}
spec: {"id", "pair", "method", "seed", "lr", "overrides": [...], "out_dir"}.
Each finished run writes <out_dir>/result.json (spec, held-out perplexities and bits per byte of the exported
student, with job["task"] its stdlib_keyword accuracy, wall time, optimizer steps and tokens, per-stage loss
history read back from MLflow, pairing); a run whose result.json exists is skipped, so an interrupted benchmark
resumes. Held-out sets are packed with the student's tokenizer (ids_NT, mask_NT) by the project's data code and
scored with `semalign_ds.evaluation.evaluate.nll_sum` (perplexity; bits per byte over the bytes the predicted
tokens cover).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE), str(REPO)]

import torch  # noqa: E402
import yaml  # noqa: E402

EVAL_SETS = ("target_val", "target_test", "general_test")
LOSS_KEYS = ("loss", "layer_loss", "out_loss", "label_loss", "tokens", "grad_cos_layer_kl", "w_layer_effective")


def run_config(spec: dict, pair: dict, base_overrides: list[str], mlflow_uri: str | None, experiment: str):
    """The pipeline config of one run: configs/demo.yaml + size budget + method + lr/seed."""
    from semalign_ds import config as cfgmod

    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["teacher"]["path"], raw["student"]["path"] = pair["teacher"], pair["student"]
    raw["data"]["path"] = pair["transfer"]
    raw["eval"] = {"sets": {}}  # held-out scoring happens here, once per run, on the exported student
    raw["tracking"] = {"enabled": mlflow_uri is not None, "uri": mlflow_uri, "experiment": experiment,
                       "log_model": "never"}  # the students are deleted after scoring unless keep_models
    overrides = [*base_overrides, *spec["overrides"], f"schedule.lr={spec['lr']}", f"seed={spec['seed']}",
                 f"name={spec['id']}", f"output_dir={spec['out_dir']}"]
    return cfgmod.config_from_dict(raw, overrides)


class EvalSets:
    """Held-out blocks per (student tokenizer, seq_len), packed once per worker."""

    def __init__(self, max_sequences: int, batch_size: int = 16):
        self.max_sequences, self.batch_size, self._cache = max_sequences, batch_size, {}

    def batches(self, pair: dict, name: str, tokenizer, seq_len: int) -> list:
        return self._packed(pair, name, tokenizer, seq_len)[0]

    def nbytes(self, pair: dict, name: str, tokenizer, seq_len: int) -> int:
        """UTF-8 bytes the predicted tokens of the set's blocks cover (bits per byte)."""
        return self._packed(pair, name, tokenizer, seq_len)[1]

    def _packed(self, pair: dict, name: str, tokenizer, seq_len: int) -> tuple[list, int]:
        from semalign_ds import data as datamod
        from semalign_ds.evaluation.evaluate import _block_bytes

        key = (pair["student"], name, seq_len)
        if key not in self._cache:
            texts = datamod.load_texts({"path": pair[name], "format": "auto", "text_field": "text"}, name)
            blocks = datamod.pack_sequences(texts, tokenizer, seq_len, self.max_sequences)
            bs = self.batch_size
            batches = [(blocks.ids_NT[i:i + bs], blocks.mask_NT[i:i + bs]) for i in range(0, len(blocks), bs)]
            self._cache[key] = (batches, int(_block_bytes(texts, blocks, tokenizer)[0].sum()))
        return self._cache[key]


def score(model_dir: str, pair: dict, evals: EvalSets, seq_len: int, device: str,
          task: bool = False) -> tuple[dict, dict, dict | None]:
    """(perplexity, bits per byte) per held-out set, and the stdlib_keyword scores when `task`."""
    import math

    from semalign_ds.evaluation import keyword_task
    from semalign_ds.evaluation.evaluate import bits_per_byte, nll_sum
    from semalign_ds.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(model_dir, torch.float32, device, key="student")
    tok = load_tokenizer(model_dir, "student")
    ppl, bpb = {}, {}
    for name in EVAL_SETS:
        if name not in pair:
            continue
        nats, count = nll_sum(model, evals.batches(pair, name, tok, seq_len), device)
        ppl[name], bpb[name] = math.exp(nats / count), bits_per_byte(nats, evals.nbytes(pair, name, tok, seq_len))
    scores = None
    if task:
        scores = keyword_task.score_items(model, tok, keyword_task.build_items(), device)
    return ppl, bpb, scores


def loss_history(uri: str | None, experiment: str, run_name: str) -> dict[str, dict[str, list]]:
    """{stage: {metric: [(step in stage, value), ...]}} logged by the pipeline for one run (on its global step axis,
    with the stage as the metric `stage`); empty without MLflow."""
    if uri is None:
        return {}
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName LIKE '{run_name} |%'",  # tracking.run_name
                              order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    if not runs:
        return {}
    run_id = runs[0].info.run_id
    stage_of = {m.step: int(m.value) for m in client.get_metric_history(run_id, "stage")}
    first = {}
    for step, stage in sorted(stage_of.items()):
        first.setdefault(stage, step)
    out: dict[str, dict[str, list]] = {}
    for key in LOSS_KEYS:
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step):
            stage = stage_of.get(m.step)
            if stage is not None:
                out.setdefault(str(stage), {}).setdefault(key, []).append((m.step - first[stage] + 1, m.value))
    return out


def _pairing(out_dir: Path) -> list:
    path = out_dir / "pairing.json"
    if not path.is_file():
        return []
    return [row.get("interp") or row.get("source_layer") for row in json.loads(path.read_text())["rows"]]


def run_one(spec: dict, job: dict, evals: EvalSets) -> dict:
    from semalign_ds.run import pipeline

    pair = job["pairs"][spec["pair"]]
    cfg = run_config(spec, pair, job["base_overrides"], job.get("mlflow_uri"), job["experiment"])
    start = time.perf_counter()
    summary = pipeline.run(cfg)
    wall = time.perf_counter() - start
    ppl, bpb, task = score(summary["student_dir"], pair, evals, cfg.data.seq_len, cfg.runtime.device,
                           bool(job.get("task")))
    history = loss_history(job.get("mlflow_uri"), job["experiment"], spec["id"])
    steps = sum(len(h.get("loss", [])) for h in history.values())
    tokens = sum(v for h in history.values() for _, v in h.get("tokens", [])) * cfg.schedule.grad_accum
    out = Path(spec["out_dir"])
    result = dict(spec, ppl=ppl, bpb=bpb, task=task, wall_s=round(wall, 2), steps=steps, tokens=int(tokens),
                  history=history,
                  pairing=_pairing(out), mode=cfg.schedule.mode, status="ok")
    if not job.get("keep_models"):
        for name in ("checkpoint", "student"):
            shutil.rmtree(out / name, ignore_errors=True)
    return result


def teach_one(spec: dict, job: dict) -> dict:
    """A spool for a teacher setting (spec kind "teach"): `semalign teach` with the setting's config."""
    from semalign_ds.run import pipeline

    pair = job["pairs"][spec["pair"]]
    cfg = run_config(spec, pair, job["base_overrides"], job.get("mlflow_uri"), job["experiment"])
    start = time.perf_counter()
    manifest = pipeline.teach(cfg)
    return dict(spec, status="ok", wall_s=round(time.perf_counter() - start, 2), bytes=manifest.get("bytes"),
                num_samples=manifest.get("num_samples"), emitted=manifest.get("emitted_samples"))


def warm_up(device: str, mlflow_uri: str | None) -> None:
    """Process-wide one-time costs (DeepSpeed import, its communication op, the process group, the MLflow store's
    tables) before the first run, so that every run's wall time counts the same work."""
    from semalign_ds.cluster import distributed
    from semalign_ds.engines.teacher import import_deepspeed

    distributed.init(device)
    import_deepspeed(device).init_distributed()
    if mlflow_uri is not None:
        import mlflow

        mlflow.MlflowClient(tracking_uri=mlflow_uri).search_experiments()


def main(job_path: str) -> int:
    from mamba_scan import install

    install()
    torch.set_num_threads(int(json.loads(Path(job_path).read_text()).get("threads", 1)))
    job = json.loads(Path(job_path).read_text())
    warm_up(job.get("device", "cpu"), job.get("mlflow_uri"))
    evals, failed = EvalSets(job["eval_sequences"]), 0
    for spec in job["specs"]:
        target = Path(spec["out_dir"]) / "result.json"
        if target.is_file() and json.loads(target.read_text()).get("status") == "ok":
            continue
        try:
            result = teach_one(spec, job) if spec.get("kind") == "teach" else run_one(spec, job, evals)
        except Exception as err:  # one failed run must not sink the benchmark; the table shows it
            failed += 1
            result = dict(spec, status="failed", error=f"{type(err).__name__}: {err}",
                          traceback=traceback.format_exc()[-4000:])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=1))
        print(f"[worker] {spec['id']}: {result['status']} "
              f"{json.dumps(result.get('ppl', result.get('error')))} {result.get('wall_s', '')}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
