"""Capture residual-stream states h^(l) from a model's own decoder layers during a normal forward.

h^(0) is the input of decoder layer 1 (embedding output, after any position embeddings), h^(l) the output of
decoder layer l (METHOD.md §4: taken from the layers, not output_hidden_states, whose last entry comes after the
final norm in transformers 5). Shapes: hidden_BTD.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch

from semalign_ds.models.adapters import BoundAdapter


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def capture_states(adapter: BoundAdapter, layer_ids: Iterable[int], detach: bool = False):
    """Yield a dict {l: hidden_BTD} that the next forward of `adapter.model` fills for each l in layer_ids.

    With detach=False the states stay in the autograd graph (attribution, student training).
    """
    wanted = sorted(set(int(l) for l in layer_ids))
    num_layers = adapter.num_layers
    bad = [l for l in wanted if not 0 <= l <= num_layers]
    if bad:
        raise ValueError(f"layer ids {bad} are out of range 0..{num_layers}")
    states: dict[int, torch.Tensor] = {}
    keep = (lambda t: t.detach()) if detach else (lambda t: t)
    handles = []
    if 0 in wanted:
        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            states[0] = keep(hidden)
        handles.append(adapter.layer(1).register_forward_pre_hook(pre_hook, with_kwargs=True))
    for l in wanted:
        if l == 0:
            continue
        def post_hook(module, args, output, l=l):
            states[l] = keep(_first(output))
        handles.append(adapter.layer(l).register_forward_hook(post_hook))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()
