"""The learning-rate schedule of every training loop here (the student's stages, the demo's pretraining)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """The factor on the peak rate at optimizer step `step` (0-based): linear warmup over `warmup_steps`, then a
    cosine decay to `min_ratio` at `total_steps`. A pure function of the step, so a resumed run continues exactly."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
