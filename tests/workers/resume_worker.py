"""torchrun worker: a stage trained 6 optimizer steps straight equals 3 steps + save + fresh load + 3 steps.

Variants: full layer fp32 with gradient accumulation 2, full layer bf16 (fp32 master weights must be restored,
not re-derived from bf16 weights), LoRA (adapter weights live only in the optimizer partitions and the engine).
"""
from engines_common import worker_finish, worker_start

out_dir, rest = worker_start()

import argparse  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from engines_common import DS_CONFIGS  # noqa: E402
from packets import synthetic_packet  # noqa: E402
from semalign_ds.engines.checkpoint import load_stage_state, model_dir, read_progress, save_stage_state  # noqa: E402
from semalign_ds.engines.ds_config import load_template, student_ds_config  # noqa: E402
from semalign_ds.engines.student import ObjectiveSpec, StudentStage  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
args = parser.parse_args(rest)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
K, STEPS = 2, 6
VARIANTS = {
    "fp32_accum2": dict(bf16=False, grad_accum=2, adapter_kind="full"),
    "bf16": dict(bf16=True, grad_accum=1, adapter_kind="full"),
    "lora": dict(bf16=False, grad_accum=1, adapter_kind="lora"),
}


def make_stage(model, variant):
    v = VARIANTS[variant]
    torch.manual_seed(0)  # LoRA's A init draws from the global RNG: same start for the straight and first runs
    cfg = student_ds_config(load_template(DS_CONFIGS / "student_zero2.json"), bf16=v["bf16"], micro_batch=2,
                            grad_accum=v["grad_accum"], world_size=world, grad_clip=1.0)
    return StudentStage(model, K, ds_config=cfg, lr=3e-3, warmup_steps=2, total_steps=STEPS, weight_decay=0.1,
                        objective=ObjectiveSpec("relation_geometry", "kl", w_label=0.5),
                        adapter_kind=v["adapter_kind"], lora_rank=4, lora_alpha=8.0)


def train(stage, variant, first_step, n_steps):
    gas = VARIANTS[variant]["grad_accum"]
    for micro in range(first_step * gas, (first_step + n_steps) * gas):
        stage.step(synthetic_packet(seed=100 * rank + micro, k=K))


def load(path, variant):
    dtype = torch.bfloat16 if VARIANTS[variant]["bf16"] else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def compare(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb), (sorted(set(sa) ^ set(sb)))
    return {"max_diff": max(float((sa[n].float() - sb[n].float()).abs().max()) for n in sa),
            "all_equal": all(torch.equal(sa[n], sb[n]) for n in sa)}


result = {}
for variant in VARIANTS:
    straight = make_stage(load(args.model, variant), variant)
    train(straight, variant, 0, STEPS)
    straight_model = straight.finish()

    first = make_stage(load(args.model, variant), variant)
    train(first, variant, 0, STEPS // 2)
    ckpt = out_dir / f"ckpt_{variant}"
    save_stage_state(ckpt, first, step=STEPS // 2, extra={"tokens_seen": 123})
    first.finish()
    del first
    resumed = make_stage(load(model_dir(ckpt), variant), variant)
    progress = load_stage_state(ckpt, resumed)
    lr_after_load = resumed.current_lr()
    train(resumed, variant, STEPS // 2, STEPS - STEPS // 2)
    resumed_model = resumed.finish()
    result[variant] = {**compare(straight_model, resumed_model), "progress": progress,
                       "lr_after_load": lr_after_load, "steps": resumed.steps,
                       "files": sorted(p.name for p in ckpt.iterdir())}
    dist.barrier()

result["progress_read"] = read_progress(out_dir / "ckpt_bf16")
worker_finish(out_dir, result)
