"""Low-rank adapters for the frontier layer (METHOD.md §6, `adapter: lora`), through PEFT.

`add_lora(layer, targets, rank, alpha)` injects PEFT LoRA modules (A kaiming-uniform, B zero, scale alpha / rank,
no dropout) into the Linear / Conv1D submodules of one decoder layer whose dotted names contain a target, and
returns the new trainable parameters; `merge_lora(layer)` folds each update into its base weight and puts the base
back, so the state dict's keys are those from before and the student exports as a plain checkpoint. The base
weights' requires_grad flags are the caller's before and after (PEFT would freeze them). Works under the ZeRO-2
student engine (tests/test_engines_student.py: only the adapter of layer k trains; merged at the stage's end).
"""
from __future__ import annotations

from torch import nn


def _is_target_type(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def add_lora(module: nn.Module, target_names, rank: int, alpha: float) -> list[nn.Parameter]:
    """Wrap every Linear/Conv1D submodule of `module` whose dotted name contains one of `target_names` (modules
    already wrapped are left alone); returns the new trainable parameters (A, B per wrapped module, in module
    order). ValueError naming schedule.lora_targets if nothing matched."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"schedule.lora_rank must be >= 1, got {rank}")
    wrapped = {n for n, _ in lora_layers(module)}
    names = [n for n, sub in module.named_modules() if n and _is_target_type(sub) and any(t in n for t in target_names)
             and not any(n == w or n.startswith(w + ".") for w in wrapped)]
    if not names:
        linear = [n for n, s in module.named_modules() if _is_target_type(s)]
        raise ValueError(f"schedule.lora_targets {list(target_names)} matched no Linear/Conv1D submodule; "
                         f"available: {linear[:20]}")
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    adapter = f"frontier{len(wrapped)}"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=names,
                        fan_in_fan_out=any(type(module.get_submodule(n)).__name__ == "Conv1D" for n in names))
    inject_adapter_in_model(config, module, adapter_name=adapter)
    for n, p in module.named_parameters():  # PEFT freezes what it did not add; the caller's flags stand elsewhere
        base = n.replace(".base_layer.", ".")
        p.requires_grad_(adapter in n or (".base_layer." not in n and flags.get(base, False)))
    for n in names:  # a wrapped base trains only through its adapter; merge_lora gives it its flags back
        module.get_submodule(n).semalign_base_flags = {pn: flags[f"{n}.{pn}"] for pn, _ in
                                                      module.get_submodule(n).get_base_layer().named_parameters()}
    return [p for n, p in module.named_parameters() if adapter in n]


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA update in `module` into its base weight and put the base back (the keys from before
    add_lora); the base weights keep their requires_grad flags. Returns `module`."""
    for name, lora in lora_layers(module):
        lora.merge(adapter_names=list(lora.lora_A.keys()))
        base = lora.get_base_layer()
        for n, p in base.named_parameters():
            p.requires_grad_(getattr(lora, "semalign_base_flags", {}).get(n, False))
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, base)
    return module
