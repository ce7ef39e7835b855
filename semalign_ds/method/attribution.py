"""Layer Gradient x Activation attribution on the teacher (METHOD.md §3), and the layer ablation hook (§8).

score(l) = mean over valid tokens of | sum over channels of (dL/dh^(l)) * h^(l) |, and the signed
variant without the absolute value. Shape legend: states maps layer l -> hidden_BTD (part of the
graph of ``loss``), mask_BT bool (True = real token), returned abs_L / signed_L float32 of length
len(states), ordered by layer id. Only activation gradients are taken; parameters may stay frozen.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Mapping

import torch
from torch import nn


def _token_scores(states: Mapping[int, torch.Tensor], loss: torch.Tensor,
                  retain_graph: bool) -> list[torch.Tensor]:
    layers = sorted(states)
    tensors = [states[l] for l in layers]
    grads = torch.autograd.grad(loss, tensors, retain_graph=retain_graph, allow_unused=True)
    out = []
    for h, g in zip(tensors, grads):
        if g is None:  # the state does not influence the loss
            out.append(torch.zeros(h.shape[:-1], dtype=torch.float32, device=h.device))
        else:
            out.append((g.float() * h.detach().float()).sum(dim=-1))
    return out


def layer_grad_x_act(states: Mapping[int, torch.Tensor], loss: torch.Tensor, mask_BT: torch.Tensor | None = None,
                     retain_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(abs_L, signed_L): per-layer mean over valid tokens of |g . h| and of g . h."""
    if not states:
        raise ValueError("layer_grad_x_act needs at least one captured layer state")
    per_token = _token_scores(states, loss, retain_graph)
    mask = torch.ones(per_token[0].shape, dtype=torch.bool) if mask_BT is None else mask_BT
    m = mask.to(device=per_token[0].device, dtype=torch.float32)
    n = m.sum().clamp_min(1.0)
    abs_L = torch.stack([(s.abs() * m).sum() / n for s in per_token])
    signed_L = torch.stack([(s * m).sum() / n for s in per_token])
    return abs_L.detach(), signed_L.detach()


class AttributionAccumulator:
    """Token-weighted running means of the per-layer scores over batches.

    Sums are float64 on CPU; ``sum_abs``, ``sum_signed`` and ``n_tokens`` can be all-reduced across
    ranks before ``means()`` by whoever owns the process group.
    """

    def __init__(self, layers):
        self.layers = sorted(layers)
        self.sum_abs = torch.zeros(len(self.layers), dtype=torch.float64)
        self.sum_signed = torch.zeros(len(self.layers), dtype=torch.float64)
        self.n_tokens = torch.zeros((), dtype=torch.float64)

    def add(self, abs_L: torch.Tensor, signed_L: torch.Tensor, n_tokens: int | float) -> None:
        """Add one batch's mean scores, weighted by its number of valid tokens."""
        if abs_L.numel() != len(self.layers) or signed_L.numel() != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} layer scores, got {abs_L.numel()} and {signed_L.numel()}")
        self.sum_abs += abs_L.detach().double().cpu() * float(n_tokens)
        self.sum_signed += signed_L.detach().double().cpu() * float(n_tokens)
        self.n_tokens += float(n_tokens)

    def update(self, states: Mapping[int, torch.Tensor], loss: torch.Tensor,
               mask_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Score one batch with ``layer_grad_x_act`` and add it; returns that batch's scores."""
        if sorted(states) != self.layers:
            raise ValueError(f"states cover layers {sorted(states)}, accumulator expects {self.layers}")
        abs_L, signed_L = layer_grad_x_act(states, loss, mask_BT)
        first = states[self.layers[0]]
        n = first.shape[0] * first.shape[1] if mask_BT is None else int(mask_BT.sum())
        self.add(abs_L, signed_L, n)
        return abs_L, signed_L

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-weighted (abs_L, signed_L) over everything added so far (float64)."""
        if self.n_tokens <= 0:
            raise ValueError("no tokens were attributed: the attribution data yielded no valid tokens")
        return self.sum_abs / self.n_tokens, self.sum_signed / self.n_tokens

    def scores_by_layer(self) -> tuple[dict[int, float], dict[int, float]]:
        """({l: abs score}, {l: signed score}) for ``pairing.build_pairing``."""
        abs_L, signed_L = self.means()
        return ({l: float(v) for l, v in zip(self.layers, abs_L)},
                {l: float(v) for l, v in zip(self.layers, signed_L)})


def _identity_output(module, args, kwargs, output):
    """Forward hook: the decoder layer's output hidden state replaced by its input (h^(l) = h^(l-1))."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


@contextmanager
def skip_layer(layer: nn.Module):
    """While inside, decoder `layer` adds nothing to the residual stream: it returns its input hidden state (it
    still runs, so hooks of other tools, e.g. ZeRO-3 parameter gathering, see the same forward)."""
    handle = layer.register_forward_hook(_identity_output, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
