"""torchrun worker: attribution by ablation and the final-norm gain on a ZeRO-3 teacher partitioned over the ranks
equal a plain model's (each rank scores its own batch; the scores are all-reduced, so every rank gets the scores of
all ranks' batches)."""
from engines_common import batch, worker_finish, worker_start

out_dir, rest = worker_start()

import argparse  # noqa: E402
import copy  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402

from engines_common import DS_CONFIGS  # noqa: E402
from semalign_ds.engines.ds_config import load_template, teacher_ds_config  # noqa: E402
from semalign_ds.engines.teacher import TeacherEngine  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
args = parser.parse_args(rest)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

from transformers import AutoModelForCausalLM  # noqa: E402

ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()


def lm_loss_sum(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
    valid = mask[:, :-1] & mask[:, 1:]
    return float(torch.nn.functional.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid], reduction="sum")), \
        int(valid.sum())


def mean_loss(model, batches):
    parts = [lm_loss_sum(model, ids, mask) for ids, mask in batches]
    return sum(p[0] for p in parts) / sum(p[1] for p in parts)


every = [batch(seed=100 + r) for r in range(world)]  # all ranks' batches: the all-reduced reference
clean = mean_loss(ref, every)
reference = []
for l in range(ref.config.num_hidden_layers):
    pruned = copy.deepcopy(ref)
    del pruned.model.layers[l]
    reference.append(mean_loss(pruned, every) - clean)

cfg = teacher_ds_config(load_template(DS_CONFIGS / "teacher_zero3_offload_cpu.json"), offload="cpu", bf16=False,
                        micro_batch=2, world_size=world, device="cpu", hidden_size=32)
teacher = TeacherEngine.from_pretrained(args.model, ds_config=cfg, dtype=torch.float32, device="cpu")
layers = range(1, ref.config.num_hidden_layers + 1)
scores, clean_engine = teacher.attribute_by_ablation([batch(seed=100 + rank)], layers)
gain = teacher.final_norm_gain(keep=True)
worker_finish(out_dir, {"scores": scores.tolist(), "reference": reference, "clean": clean_engine,
                        "clean_reference": clean, "gain_diff": float((gain - ref.model.norm.weight).abs().max())})
