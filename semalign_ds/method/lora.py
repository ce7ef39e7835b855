"""Low-rank adapters for the frontier layer (METHOD.md §6, `adapter: lora`).

Shape legend: a wrapped projection maps x_*I (I = in_features) to y_*O (O = out_features);
lora_A is r x I, lora_B is O x r, the update is (x A^T B^T) * alpha / r. transformers' GPT-2 style
``Conv1D`` (weight I x O, y = x W + b) is treated as a linear layer with the transposed weight; it is
recognised by class name so this module imports only torch.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _is_target_type(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _in_out(base: nn.Module) -> tuple[int, int]:
    if _is_conv1d(base):
        return base.weight.shape[0], base.weight.shape[1]
    return base.in_features, base.out_features


class LoRALinear(nn.Module):
    """base(x) + dropout(x) A^T B^T * alpha / rank, with the base frozen (A kaiming-uniform, B zero)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if not _is_target_type(base):
            raise ValueError(f"LoRALinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"schedule.lora_rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self._base_requires_grad = {n: p.requires_grad for n, p in base.named_parameters()}
        for p in base.parameters():
            p.requires_grad_(False)
        in_f, out_f = _in_out(base)
        kw = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return self.base(x) + (update * self.scale).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        """B A * scale in float32, shaped like an nn.Linear weight (O x I)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """Fold the update into the base weight, restore its requires_grad flags and return it."""
        delta = self.delta_weight()
        w = self.base.weight
        w.copy_((w.float() + (delta.T if _is_conv1d(self.base) else delta)).to(w.dtype))
        for n, p in self.base.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, False))
        return self.base


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def add_lora(module: nn.Module, target_names, rank: int, alpha: float, dropout: float = 0.0) -> list[nn.Parameter]:
    """Wrap every Linear/Conv1D submodule whose dotted name contains one of ``target_names``.

    Returns the new trainable parameters (A, B per wrapped module, in module order). Already wrapped
    modules are left alone. ValueError (naming schedule.lora_targets) if nothing matched.
    """
    targets = list(target_names)
    wrapped_prefixes = [n + "." if n else "" for n, m in module.named_modules() if isinstance(m, LoRALinear)]
    found = []
    for name, sub in module.named_modules():
        if isinstance(sub, LoRALinear) or any(name.startswith(p) for p in wrapped_prefixes):
            continue
        if name and _is_target_type(sub) and any(t in name for t in targets):
            found.append((name, sub))
    if not found:
        linear_names = [n for n, s in module.named_modules() if _is_target_type(s)]
        raise ValueError(f"schedule.lora_targets {targets} matched no Linear/Conv1D submodule; "
                         f"available: {linear_names[:20]}")
    params: list[nn.Parameter] = []
    for name, sub in found:
        parent, child = _split(name)
        wrapped = LoRALinear(sub, rank, alpha, dropout)
        setattr(module.get_submodule(parent) if parent else module, child, wrapped)
        params += [wrapped.lora_A, wrapped.lora_B]
    return params


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRALinear in ``module`` into its base and put the base back, so state_dict keys
    are those from before ``add_lora``. Returns ``module`` (or its merged base if it is a LoRALinear)."""
    if isinstance(module, LoRALinear):
        return module.merged_base()
    wrapped = [(n, m) for n, m in module.named_modules() if isinstance(m, LoRALinear)]
    for name, lora in wrapped:
        parent, child = _split(name)
        setattr(module.get_submodule(parent) if parent else module, child, lora.merged_base())
    return module
