"""Settings in which a method is known to lose to a plain baseline (measured in docs/RESULTS.md): a run in one of
them says so when it starts, so nobody takes the default for a win where it has not been one."""
from __future__ import annotations

import logging

log = logging.getLogger("semalign_ds")


def known_losses(cfg, cross: bool) -> list[str]:
    """One line per known loss that applies to this configuration (`cross`: the tokenizers differ)."""
    m = cfg.method
    semalign = m.layer_objective not in ("none", "hidden_mse") and m.w_layer > 0
    lines = []
    if cross and semalign:
        lines.append("teacher and student tokenizers differ: in every cross-tokenizer pair measured so far (SmolLM2 "
                     "and Gemma 3 into the demo's student), SemAlign with layer targets closed less of the target "
                     "gap than plain SFT at the same budget (docs/RESULTS.md, 'Across tokenizers'); compare with "
                     "method.layer_objective=none method.output_objective=ce before relying on it")
    return lines


def warn(cfg, cross: bool, main: bool) -> None:
    if main:
        for line in known_losses(cfg, cross):
            log.warning("known loss: %s", line)
