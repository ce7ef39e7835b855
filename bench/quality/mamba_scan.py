"""A faster pure-PyTorch selective scan for transformers' Mamba on CPU (same math as its reference loop).

transformers' CPU fallback `mamba_selective_scan` indexes `discrete_A[:, :, t]` inside its loop over T; the backward
of each index writes a full B x E x T x N zero gradient, so backward costs O(T^2) memory traffic (~25 s per step for
a 2-layer, 128-wide student at B=16, T=128). This version walks the same recurrence over `unbind`-ed slices, whose
backward stacks the per-step gradients once: the result equals the reference (tests/test_quality_dry.py checks it).
`install()` swaps it into transformers' Mamba module for this process; nothing else changes.
Shapes: hidden_BET (E = intermediate), dt_BET, A_EN, B_BNT, C_BNT (N = ssm state), z_BET.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, **_):
    """Drop-in for transformers.models.mamba.modeling_mamba.mamba_selective_scan (recurrent form)."""
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    B_BTN, C_BTN = B.transpose(1, 2), C.transpose(1, 2)
    dA_BETN = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    dBu_BETN = dt[:, :, :, None] * B_BTN[:, None, :, :].float() * hidden_states[:, :, :, None].float()
    state_BEN = torch.zeros(hidden_states.shape[0], hidden_states.shape[1], A.shape[-1],
                            dtype=dA_BETN.dtype, device=hidden_states.device)
    outputs = []
    for dA_BEN, dBu_BEN, c_BN in zip(dA_BETN.unbind(2), dBu_BETN.unbind(2), C_BTN.unbind(1)):
        state_BEN = dA_BEN * state_BEN + dBu_BEN
        outputs.append(torch.matmul(state_BEN.to(input_dtype), c_BN.unsqueeze(-1))[:, :, 0])
    scan_BET = torch.stack(outputs, dim=-1)
    if D is not None:
        scan_BET = scan_BET + hidden_states * D[None, :, None]
    if z is not None:
        scan_BET = scan_BET * F.silu(z)
    return (scan_BET, state_BEN) if return_last_state else scan_BET


def install() -> bool:
    """Use `selective_scan` for transformers' Mamba in this process; True if it was installed."""
    try:
        from transformers.models.mamba import modeling_mamba
    except ImportError:
        return False
    modeling_mamba.mamba_selective_scan = selective_scan
    return True
