"""Teacher once against the per-step path (issue 9), in the same process, on a tiny pair on the CPU.

Both paths run the project's own code on one RunContext (pipeline.prepare: a ZeRO-3 teacher engine with CPU
offload, the student under ZeRO-2): attribution, pairing and M once, then `--stages` frontier stages of
`--epochs` epochs each.
- per-step (the colocated path before issue 9): every micro-batch of every stage runs the teacher forward
  (supervision.emit) and the student trains on the fresh packet;
- teacher once (now): topology.teach_local emits every sample once into a MemoryStore; every stage reads it.
Reported: wall time of the teacher work + training for each path, the number of teacher forwards and their FLOPs
(throughput.forward_flops), the ratios, and whether both paths end with the same student weights (they must: the
packets are the same).

Usage: python bench/teacher_once_bench.py [--stages 4] [--epochs 3] [--sequences 64] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import yaml  # noqa: E402


def make_pair(out: Path, student_layers: int) -> dict:
    """A stdlib BPE tokenizer, an 8 x 128 teacher and a `student_layers` x 64 student (random weights)."""
    import transformers as tr
    from conftest import make_tiny_pair

    pair = make_tiny_pair(out)
    for name, (layers, hidden) in {"teacher": (8, 128), "student": (student_layers, 64)}.items():
        config = tr.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
                                max_position_embeddings=128, eos_token_id=0, bos_token_id=0, pad_token_id=0)
        torch.manual_seed(1)
        tr.AutoModelForCausalLM.from_config(config).save_pretrained(pair[name])
    return pair


class PerStepFeed:
    """The per-step path: a teacher forward for every micro-batch of every stage (what colocated runs did)."""

    def __init__(self, ctx, recipes, M):
        self.ctx, self.recipes, self.M, self.forwards = ctx, recipes, M, 0

    def source(self, k, layers, start, steps):
        from semalign_ds import data as datamod
        from semalign_ds.run import supervision
        from semalign_ds.run.budget import stage_seed

        cfg, info = self.ctx.cfg, self.ctx.info
        for index in range(start * cfg.schedule.grad_accum, steps * cfg.schedule.grad_accum):
            ids = datamod.micro_batch_ids(len(self.ctx.blocks), cfg.data.micro_batch_size, info.world_size,
                                          info.rank, stage_seed(cfg, k), index)
            self.forwards += 1
            yield supervision.emit(self.ctx, datamod.take(self.ctx.blocks, ids),
                                   {l: self.recipes[l] for l in layers}, self.M)

    def stats(self):
        return {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from semalign_ds import config as cfgmod
    from semalign_ds.cluster import distributed
    from semalign_ds.run import pipeline
    from semalign_ds.run import resume
    from semalign_ds.planning import throughput
    from semalign_ds.run import topology
    from semalign_ds.models.loading import load_config
    from semalign_ds.transport.codec import Codec
    from semalign_ds.transport.store import MemoryStore

    tmp = Path(args.out or tempfile.mkdtemp(prefix="teacher-once-"))
    pair = make_pair(tmp / "pair", args.stages)
    raw = {"name": "bench", "output_dir": str(tmp / "run"), "seed": 0,
           "teacher": {"path": str(pair["teacher"]), "dtype": "float32"},
           "student": {"path": str(pair["student"]), "dtype": "float32"},
           "data": {"path": str(pair["train"]), "seq_len": 64, "max_sequences": args.sequences, "micro_batch_size": 8},
           "method": {"top_k": 16, "min_shared_tokens": 100, "target_dtype": "float32"},
           "schedule": {"mode": "frontier", "epochs_per_stage": args.epochs, "warmup_steps": 1, "lr": 1e-3},
           "transport": {"codec": "lossless"},  # the per-step baseline emits full packets: compare like with like
           "runtime": {"device": "cpu", "progress": False, "resume": False, "checkpoint_every": 10**6},
           "tracking": {"enabled": False}}
    cfg = cfgmod.config_from_dict(raw)
    info = distributed.init("cpu")
    ctx, _ = pipeline.prepare(cfg, info)
    progress = resume.Progress(cfgmod.result_hash(cfg))
    table = pipeline.pair_layers(ctx, progress)
    M = pipeline.mapping.build_map(ctx, table)
    plan = ctx.spec.budget
    recipes = pipeline._recipes(ctx, table, ctx.spec.trained_layers)
    initial = {k: v.clone() for k, v in ctx.student.state_dict().items()}
    shape = throughput.ModelShape.from_config(load_config(cfg.teacher.path))
    flops_per_forward = throughput.forward_flops(shape, cfg.data.micro_batch_size, cfg.data.seq_len)

    def train(feed):
        ctx.student.load_state_dict(initial)
        t0 = time.perf_counter()
        pipeline.train_stages(ctx, resume.Progress(cfgmod.result_hash(cfg)), feed)
        return time.perf_counter() - t0, {k: v.clone() for k, v in ctx.student.state_dict().items()}

    per_step = PerStepFeed(ctx, recipes, M)
    per_step_s, per_step_w = train(per_step)
    t0 = time.perf_counter()
    store = MemoryStore(len(ctx.blocks), len(ctx.blocks))
    counts = topology.teach_local(ctx, store, recipes, M, Codec())
    teach_s = time.perf_counter() - t0
    train_s, once_w = train(topology.Feed(ctx, store, "memory", Codec()))
    same = all(torch.allclose(per_step_w[k], once_w[k], atol=1e-5, rtol=1e-5) for k in once_w)
    result = {
        "stages": len(plan.stages), "epochs_per_stage": args.epochs, "steps_per_stage": plan.stages[0].steps,
        "sequences": len(ctx.blocks), "per_step": {"wall_s": per_step_s, "teacher_forwards": per_step.forwards,
                                                   "teacher_flops": per_step.forwards * flops_per_forward},
        "teacher_once": {"wall_s": teach_s + train_s, "teach_s": teach_s, "train_s": train_s,
                         "teacher_forwards": counts["passes"], "teacher_flops": counts["passes"] * flops_per_forward},
        "same_weights": same}
    result["wall_ratio"] = result["teacher_once"]["wall_s"] / per_step_s
    result["flops_ratio"] = result["teacher_once"]["teacher_flops"] / result["per_step"]["teacher_flops"]
    print(json.dumps(result, indent=1))
    print(f"\n| path | teacher forwards | teacher GFLOP | wall s |\n|---|---:|---:|---:|\n"
          f"| per-step | {per_step.forwards} | {result['per_step']['teacher_flops'] / 1e9:.2f} | {per_step_s:.1f} |\n"
          f"| teacher once | {counts['passes']} | {result['teacher_once']['teacher_flops'] / 1e9:.2f} | "
          f"{teach_s + train_s:.1f} (teach {teach_s:.1f}) |\n\nteacher-once / per-step: wall "
          f"{result['wall_ratio']:.3f}, teacher FLOPs {result['flops_ratio']:.4f}; same student weights: {same}")
    (tmp / "teacher_once_bench.json").write_text(yaml.safe_dump(result))


if __name__ == "__main__":
    main()
