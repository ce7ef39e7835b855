"""The supervision packet: what the teacher sends the student for one batch.

Legend: B batch, T tokens, D_S student hidden size, K top-k, V vocabulary.
- ids_BT (int64), mask_BT (bool, True = real token), sample_ids_B (int64: which packed sequences)
- targets: {student layer k (1-indexed): target_BTD_S}, the teacher's paired residuals (or states, for
  fisher_logits) already mapped through M into student space
- top_values_BTK / top_idx_BTK / tail_BT: teacher top-k logits, their vocabulary ids (student ids), and the
  teacher probability mass outside the top-k at temperature tau; or full_logits_BTV where they are at hand.
  top_idx_BTK is None for the uld output objective (sorted probabilities need no ids).
- Cross-tokenizer packets (the teacher read its own tokens; data/alignment.py) stay student-shaped and add
  state_mask_BT (bool: real student tokens that have an aligned teacher state; the layer losses' mask) and
  out_mask_BT (bool: those whose aligned teacher token ends exactly where the student token ends; the output
  loss's mask). Both are None for same-tokenizer packets, whose losses use mask_BT.
- loss_mask_BT (bool, conversation data only): the answer tokens the student's losses cover. It never travels:
  the student side attaches it from its own packed data (topology.Feed), so the wire format is unchanged. The
  layer mask keeps answer positions; the output and label terms keep predictions of answer tokens (position t
  where token t+1 is one). None = every real token.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Protocol

import torch


@dataclass
class SupervisionPacket:
    ids_BT: torch.Tensor
    mask_BT: torch.Tensor
    sample_ids_B: torch.Tensor
    targets: dict[int, torch.Tensor] = field(default_factory=dict)
    top_values_BTK: torch.Tensor | None = None
    top_idx_BTK: torch.Tensor | None = None
    tail_BT: torch.Tensor | None = None
    full_logits_BTV: torch.Tensor | None = None
    state_mask_BT: torch.Tensor | None = None
    out_mask_BT: torch.Tensor | None = None
    loss_mask_BT: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.mask_BT.sum())

    @property
    def layer_mask_BT(self) -> torch.Tensor:
        """Where the layer losses apply: the aligned positions (cross-tokenizer), else every real token; of those
        only the answer tokens where loss_mask_BT is set."""
        mask = self.mask_BT if self.state_mask_BT is None else self.state_mask_BT
        return mask if self.loss_mask_BT is None else mask & self.loss_mask_BT

    @property
    def output_mask_BT(self) -> torch.Tensor:
        """Where the teacher's output distribution is a target: exact positions (cross-tokenizer), else mask_BT;
        with loss_mask_BT only the positions whose next token is an answer token."""
        mask = self.mask_BT if self.out_mask_BT is None else self.out_mask_BT
        return mask if self.loss_mask_BT is None else mask & _predicts(self.loss_mask_BT)

    @property
    def label_mask_BT(self) -> torch.Tensor:
        """B x (T-1): next-token pairs (t, t+1) of real tokens where the label term counts; with loss_mask_BT only
        those whose label t+1 is an answer token."""
        pairs = self.mask_BT[:, :-1] & self.mask_BT[:, 1:]
        return pairs if self.loss_mask_BT is None else pairs & self.loss_mask_BT[:, 1:]

    def to(self, device: torch.device | str) -> "SupervisionPacket":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)
        return replace(
            self,
            ids_BT=move(self.ids_BT), mask_BT=move(self.mask_BT), sample_ids_B=move(self.sample_ids_B),
            targets={k: move(v) for k, v in self.targets.items()},
            top_values_BTK=move(self.top_values_BTK), top_idx_BTK=move(self.top_idx_BTK),
            tail_BT=move(self.tail_BT), full_logits_BTV=move(self.full_logits_BTV),
            state_mask_BT=move(self.state_mask_BT), out_mask_BT=move(self.out_mask_BT),
            loss_mask_BT=move(self.loss_mask_BT),
        )

    def nbytes(self) -> int:
        tensors = [self.ids_BT, self.mask_BT, self.sample_ids_B, self.top_values_BTK, self.top_idx_BTK,
                   self.tail_BT, self.full_logits_BTV, self.state_mask_BT, self.out_mask_BT, self.loss_mask_BT,
                   *self.targets.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _predicts(supervised_BT: torch.Tensor) -> torch.Tensor:
    """Positions t whose next token t+1 is supervised (the last position predicts nothing in the block)."""
    out = torch.zeros_like(supervised_BT)
    out[:, :-1] = supervised_BT[:, 1:]
    return out


class PacketSource(Protocol):
    """Anything the student loop can iterate for packets; which transport feeds it is configuration."""

    def __iter__(self) -> Iterator[SupervisionPacket]: ...


class InProcessSource:
    """Colocated transport: packets are produced on demand by a callable in the same process."""

    def __init__(self, produce: Iterable[SupervisionPacket]):
        self._produce = produce

    def __iter__(self) -> Iterator[SupervisionPacket]:
        return iter(self._produce)
