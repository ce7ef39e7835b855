"""torchrun worker: the ZeRO-3 offload teacher's outputs equal a plain forward of the same checkpoint.

Each rank emits packets for its own batch (ranks differ; forward runs in lockstep), and compares targets, top-k,
full logits, the vocabulary-mapped top-k, gathered weights and attribution scores with the plain model.
"""
from engines_common import batch, worker_finish, worker_start

out_dir, rest = worker_start()

import argparse  # noqa: E402

import torch  # noqa: E402

from semalign_ds.engines.ds_config import load_template, teacher_ds_config  # noqa: E402
from semalign_ds.engines.teacher import StudentPositions, TeacherEngine  # noqa: E402
from semalign_ds.method.basis import align  # noqa: E402
from semalign_ds.method.objectives import teacher_topk  # noqa: E402
from semalign_ds.method.targets import recipe_target, target_recipes  # noqa: E402
from semalign_ds.models.adapters import get_adapter  # noqa: E402
from semalign_ds.models.capture import capture_states  # noqa: E402
from engines_common import DS_CONFIGS  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
args = parser.parse_args(rest)


def maxdiff(a, b) -> float:
    return float((a.detach().double().cpu() - b.detach().double().cpu()).abs().max())


def reference_states(model, ids, mask, layers):
    with torch.no_grad(), capture_states(get_adapter(model), layers, detach=True) as states:
        logits = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
    return dict(states), logits


def reference_attribution(model, batches, layers):
    """Plain model with trainable params (so states are in the graph without any hook): sum g.h per token."""
    model.requires_grad_(True)
    adapter, sums, n = get_adapter(model), torch.zeros(len(layers), dtype=torch.float64), 0
    sums_signed = sums.clone()
    for ids, mask in batches:
        with capture_states(adapter, layers) as states:
            logits = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits
        valid = mask[:, :-1] & mask[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid])
        grads = torch.autograd.grad(loss, [states[l] for l in layers])
        for i, (l, g) in enumerate(zip(layers, grads)):
            per_tok = (g * states[l]).sum(-1)[mask].double()
            sums[i] += per_tok.abs().sum()
            sums_signed[i] += per_tok.sum()
        n += int(mask.sum())
    model.requires_grad_(False)
    return sums / n, sums_signed / n


rank, world = int(__import__("os").environ["RANK"]), int(__import__("os").environ["WORLD_SIZE"])
cfg = teacher_ds_config(load_template(DS_CONFIGS / "teacher_zero3_offload_cpu.json"), offload="cpu", bf16=False,
                        micro_batch=2, world_size=world, device="cpu", hidden_size=32)
teacher = TeacherEngine.from_pretrained(args.model, ds_config=cfg, dtype=torch.float32, device="cpu")

from transformers import AutoModelForCausalLM  # noqa: E402

ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
result = {"ref_partitioned": any(hasattr(p, "ds_id") for p in ref.parameters()),
          "teacher_partitioned": all(hasattr(p, "ds_id") for p in teacher.model.parameters()),
          "teacher_big_params_empty": all(p.numel() == 0 for p in teacher.model.parameters() if p.ds_numel > 1000),
          "teacher_requires_grad": any(p.requires_grad for p in teacher.model.parameters())}

ids, mask = batch(seed=100 + rank)
M = torch.randn(24, 32, generator=torch.Generator().manual_seed(7))
recipes = target_recipes([1, (2, 3, 0.25), 4], "span")
layers = sorted(set().union(*(r.teacher_layers for r in recipes.values())))
states, logits = reference_states(ref, ids, mask, layers)

packet = teacher.emit(ids, mask, torch.tensor([rank, rank + 10]), recipes, M, top_k=8, tau=2.0, need_logits=True,
                      target_dtype=torch.float32)
ref_targets = {k: align(M, recipe_target(states, r), out_dtype=torch.float32) for k, r in recipes.items()}
values, idx, tail = teacher_topk(logits, 8, 2.0)
result["target_keys"] = sorted(packet.targets)
result["target_shapes"] = [list(packet.targets[k].shape) for k in sorted(packet.targets)]
result["target_diff"] = max(maxdiff(packet.targets[k], ref_targets[k]) for k in recipes)
result["topk_value_diff"] = maxdiff(packet.top_values_BTK, values)
result["topk_idx_equal"] = bool(torch.equal(packet.top_idx_BTK.cpu(), idx))
result["tail_diff"] = maxdiff(packet.tail_BT, tail)
result["sample_ids"] = packet.sample_ids_B.tolist()

full = teacher.emit(ids, mask, torch.tensor([rank]), {}, M, top_k=0, tau=1.0, need_logits=True,
                    target_dtype=torch.float32)
result["full_logits_diff"] = maxdiff(full.full_logits_BTV, logits)
result["no_topk_with_full"] = full.top_idx_BTK is None

ids_T = torch.randperm(128, generator=torch.Generator().manual_seed(3))[:100]
ids_S = torch.arange(100) + 20
mapped = teacher.emit(ids, mask, torch.tensor([rank]), {}, M, top_k=5, tau=1.0, need_logits=True,
                      target_dtype=torch.float32, logit_ids_T=ids_T, logit_ids_S=ids_S)
mv, mi, _ = teacher_topk(logits[..., ids_T], 5, 1.0)
mt = 1 - torch.softmax(logits.float(), -1)[..., ids_T].gather(-1, mi).sum(-1)  # tail: all mass but the top-k
result["mapped_idx_equal"] = bool(torch.equal(mapped.top_idx_BTK.cpu(), ids_S[mi]))
result["mapped_value_diff"] = maxdiff(mapped.top_values_BTK, mv)
result["mapped_tail_diff"] = maxdiff(mapped.tail_BT, mt)

# cross-tokenizer: the teacher reads its tokens (B x U), the packet is gathered at the student's aligned positions
T_S = 5
align_BT = torch.randint(-1, ids.shape[1], (ids.shape[0], T_S), generator=torch.Generator().manual_seed(11 + rank))
align_BT[1, 0] = -1  # at least one student position without a teacher state
exact_BT = torch.rand(ids.shape[0], T_S, generator=torch.Generator().manual_seed(12)) > 0.5
s_mask = torch.ones(ids.shape[0], T_S, dtype=torch.bool)
s_mask[0, -1] = False
s_ids = torch.arange(ids.shape[0] * T_S).reshape(ids.shape[0], T_S)
cross = teacher.emit(ids, mask, torch.tensor([rank, rank + 10]), recipes, M, top_k=8, tau=2.0, need_logits=True,
                     target_dtype=torch.float32, sorted_only=True,
                     student=StudentPositions(s_ids, s_mask, align_BT, exact_BT))


def at(x):
    got = x.gather(1, align_BT.clamp_min(0).reshape(*align_BT.shape, *([1] * (x.dim() - 2))).expand(
        *align_BT.shape, *x.shape[2:]))
    return got.masked_fill((align_BT < 0).reshape(*align_BT.shape, *([1] * (x.dim() - 2))), 0)


result["cross_target_diff"] = max(maxdiff(cross.targets[k], at(ref_targets[k])) for k in recipes)
result["cross_value_diff"] = maxdiff(cross.top_values_BTK, at(values)) + maxdiff(cross.tail_BT, at(tail))
result["cross_masks"] = (bool(torch.equal(cross.state_mask_BT.cpu(), s_mask & (align_BT >= 0)))
                         and bool(torch.equal(cross.out_mask_BT.cpu(), s_mask & (align_BT >= 0) & exact_BT))
                         and cross.top_idx_BTK is None and bool(torch.equal(cross.ids_BT.cpu(), s_ids)))

result["head_diff"] = maxdiff(teacher.head_weight(), ref.lm_head.weight)
result["embed_diff"] = maxdiff(teacher.input_embedding_weight(), ref.model.embed_tokens.weight)
result["head_shape"] = list(teacher.head_weight().shape)
gain = teacher.final_norm_gain()  # g = weight (Llama) or 1 + weight (Gemma): the offset the norm adds
result["gain_offset"] = float((gain - ref.model.norm.weight.detach()).mean())
result["gain_offset_spread"] = float((gain - ref.model.norm.weight.detach()).std())

att_layers = [0, 1, 2, 3, 4]
all_batches = {r: [batch(seed=200 + 10 * r + i) for i in range(2)] for r in range(world)}
abs_L, signed_L = teacher.attribute(all_batches[rank], att_layers)
ref_abs, ref_signed = reference_attribution(ref, [b for r in range(world) for b in all_batches[r]], att_layers)
result["attr_abs"] = abs_L.tolist()
result["attr_abs_diff"] = maxdiff(abs_L, ref_abs)
result["attr_signed_diff"] = maxdiff(signed_L, ref_signed)
result["teacher_requires_grad_after"] = any(p.requires_grad for p in teacher.model.parameters())

# an in-memory model wrapped by a second ZeRO-3 engine gives the same states
wrapped = TeacherEngine.wrap(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), cfg)
w_states, w_logits = wrapped.forward_states(ids, mask, layers, need_logits=False)
result["wrap_state_diff"] = max(maxdiff(w_states[l], states[l]) for l in layers)
result["wrap_logits_none"] = w_logits is None
worker_finish(out_dir, result)
