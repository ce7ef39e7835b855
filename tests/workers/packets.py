"""Deterministic synthetic SupervisionPackets for the student worker tests (no teacher needed).

Legend: B batch, T tokens, D_S student hidden (32), V vocabulary (128), K top-k (8).
"""
import torch

from semalign_ds.method.objectives import teacher_topk
from semalign_ds.transport.packet import SupervisionPacket


def synthetic_packet(seed: int, k: int, B: int = 2, T: int = 10, D: int = 32, V: int = 128, top_k: int = 8,
                     full_logits: bool = False) -> SupervisionPacket:
    """Random ids (last 2 tokens of row 1 padding), a random target for layer k, teacher top-k or full logits."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[-1, -2:] = False
    target = torch.randn(B, T, D, generator=g)
    zt = 3.0 * torch.randn(B, T, V, generator=g)
    packet = SupervisionPacket(ids_BT=ids, mask_BT=mask, sample_ids_B=torch.arange(B) + seed, targets={k: target})
    if full_logits:
        packet.full_logits_BTV = zt
    else:
        packet.top_values_BTK, packet.top_idx_BTK, packet.tail_BT = teacher_topk(zt, top_k, 1.0)
    return packet
