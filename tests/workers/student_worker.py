"""torchrun worker: ZeRO-2 frontier stages change only layer k (full and LoRA); replicas stay identical.

Results per rank: which parameters changed in each stage, how much, weight hashes (compared across ranks by the
test), the losses and learning rates, and a smoke step of every objective combination.
"""
from engines_common import worker_finish, worker_start

out_dir, rest = worker_start()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from engines_common import DS_CONFIGS  # noqa: E402
from packets import synthetic_packet  # noqa: E402
from semalign_ds.engines.ds_config import load_template, student_ds_config  # noqa: E402
from semalign_ds.engines.student import ObjectiveSpec, StudentStage  # noqa: E402
from semalign_ds.method.lora import lora_layers  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
args = parser.parse_args(rest)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
cfg = student_ds_config(load_template(DS_CONFIGS / "student_zero2.json"), bf16=False, micro_batch=2, grad_accum=1,
                        world_size=world, grad_clip=1.0, hidden_size=32)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changes(before, model):
    after = dict(model.named_parameters())
    return {n: float((after[n].detach() - w).abs().max()) for n, w in before.items()}


def digest(model):
    h = hashlib.sha256()
    for n, p in sorted(model.named_parameters()):
        h.update(n.encode() + p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_stage(model, k, steps, objective, **kw):
    before = snapshot(model)
    stage = StudentStage(model, k, ds_config=cfg, lr=1e-2, warmup_steps=2, total_steps=steps, weight_decay=0.01,
                         objective=objective, **kw)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    metrics = [stage.step(synthetic_packet(seed=1000 * rank + s, k=k)) for s in range(steps)]
    stage.finish()
    moved = {n: d for n, d in changes(before, model).items() if d > 0}
    return {"trainable": trainable, "moved": sorted(moved), "max_move": max(moved.values(), default=0.0),
            "losses": [m["loss"] for m in metrics], "lrs": [m["lr"] for m in metrics],
            "metrics0": metrics[0], "requires_grad_after": any(p.requires_grad for p in model.parameters()),
            "digest": digest(model), "keys": sorted(model.state_dict())}


model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
keys0 = sorted(model.state_dict())
result = {"keys0": keys0}
result["full_k2"] = run_stage(model, 2, 4, ObjectiveSpec("relation_geometry", "kl", tau=2.0, w_label=0.5))
result["kl_only_k1"] = run_stage(model, 1, 2, ObjectiveSpec("none", "kl", w_layer=0.0))
result["lora_k3"] = run_stage(model, 3, 3, ObjectiveSpec("cosine", "kl"), adapter_kind="lora", lora_rank=4,
                              lora_alpha=8.0)
result["lora_left"] = bool(lora_layers(model))

# every objective combination runs one step and gives a finite loss
smoke = StudentStage(model, 4, ds_config=cfg, lr=1e-3, warmup_steps=0, total_steps=4, weight_decay=0.0,
                     objective=ObjectiveSpec())
specs = [ObjectiveSpec("fisher_logits", "label_cosine", target_kind="state"), ObjectiveSpec("cosine", "ce"),
         ObjectiveSpec("relation_geometry", "kl", w_label=1.0), ObjectiveSpec("none", "none", w_label=1.0)]
result["smoke"] = []
for i, spec in enumerate(specs):
    smoke.objective = spec
    m = smoke.step(synthetic_packet(seed=50 + i, k=4, full_logits=(i == 2)))
    result["smoke"].append({"spec": repr(spec), "finite": all(math.isfinite(v) for v in m.values()), **m})
smoke.finish()
worker_finish(out_dir, result)
