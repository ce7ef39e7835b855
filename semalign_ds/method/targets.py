"""Which teacher states make each student layer's target (METHOD.md §3-4), as linear mixes of states.

A mix is {teacher layer l: weight}; a target residual is mix(upper) - mix(lower), a target state is mix(upper).
- residual `layer`: upper = l_T(k), lower = l_T(k) - 1
- residual `span`:  upper = l_T(k), lower = l_T(k-1) (l_T(0) = 0)
- interpolation replaces l by (1 - lam) h^(a) + lam h^(b) on both sides.
Legend: hidden_BTD.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

Mix = dict[int, float]


@dataclass(frozen=True)
class TargetRecipe:
    student_layer: int
    upper: Mix
    lower: Mix | None  # None: the target is a state, not a residual

    @property
    def teacher_layers(self) -> set[int]:
        return set(self.upper) | set(self.lower or {})


def _point(source: int | tuple[int, int, float], shift: int = 0) -> Mix:
    if isinstance(source, (tuple, list)):
        a, b, lam = source
        mix: Mix = {}
        for layer, weight in ((a - shift, 1.0 - lam), (b - shift, lam)):
            if weight:
                mix[layer] = mix.get(layer, 0.0) + weight
        return mix
    return {int(source) - shift: 1.0}


def target_recipes(sources: list, residual: str, kind: str = "residual") -> dict[int, TargetRecipe]:
    """sources[k-1] is student layer k's source: a teacher layer, or (a, b, lam) when interpolating."""
    if residual not in ("layer", "span"):
        raise ValueError(f"method.residual must be 'layer' or 'span', got {residual!r}")
    if kind not in ("residual", "state"):
        raise ValueError(f"target kind must be 'residual' or 'state', got {kind!r}")
    recipes = {}
    for k, source in enumerate(sources, start=1):
        upper = _point(source)
        if kind == "state":
            lower = None
        elif residual == "layer":
            lower = _point(source, shift=1)
        else:
            lower = _point(sources[k - 2]) if k > 1 else {0: 1.0}
        recipes[k] = TargetRecipe(k, upper, lower)
    return recipes


def mix_states(states: dict[int, torch.Tensor], mix: Mix) -> torch.Tensor:
    out = None
    for layer, weight in mix.items():
        term = states[layer] if weight == 1.0 else states[layer] * weight
        out = term if out is None else out + term
    return out


def recipe_target(states: dict[int, torch.Tensor], recipe: TargetRecipe) -> torch.Tensor:
    """The unmapped target (teacher space) of one student layer: a residual or a state, hidden_BTD."""
    upper = mix_states(states, recipe.upper)
    return upper if recipe.lower is None else upper - mix_states(states, recipe.lower)
