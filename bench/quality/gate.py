"""The teacher-margin gate: both models' held-out perplexities before any transfer, and whether a pair qualifies.

A transfer table means something only if the teacher is clearly better than the student on the target domain and
no worse on the general part. Perplexities are per student token: the held-out text is tokenised with the
student's tokenizer (ids_BT, mask_BT); with another teacher tokenizer the teacher reads the same sequence
translated into its ids (as in the pipeline), so both numbers score the same token sequence.
margin(set) = 1 - ppl_teacher / ppl_student; the gate asks margin(target_test) >= min_margin and
margin(general_test) >= 0.
"""
from __future__ import annotations

import torch

from worker import EVAL_SETS, EvalSets


def _student_to_teacher(tok_S, tok_T) -> torch.Tensor | None:
    """student id -> teacher id by token string (-1 where the teacher lacks it); None for the same vocabulary."""
    vocab_S, vocab_T = tok_S.get_vocab(), tok_T.get_vocab()
    if vocab_S == vocab_T:
        return None
    s2t = torch.full((max(vocab_S.values()) + 1,), -1, dtype=torch.long)
    for token, i in vocab_S.items():
        s2t[i] = vocab_T.get(token, -1)
    return s2t


def _mapped(batches: list, s2t: torch.Tensor | None) -> list:
    if s2t is None:
        return batches
    out = []
    for ids_BT, mask_BT in batches:
        ids_T = s2t[ids_BT]
        if bool((ids_T[mask_BT] < 0).any()):
            raise ValueError("a held-out token of the student is missing from the teacher's vocabulary")
        out.append((ids_T.clamp(min=0), mask_BT))
    return out


def pair_perplexities(pair: dict, evals: EvalSets, seq_len: int, device: str) -> dict[str, dict[str, float]]:
    """{set: {"teacher": ppl, "student": ppl}} on target_val, target_test, general_test."""
    from semalign_ds.evaluation.evaluate import perplexity
    from semalign_ds.models.loading import load_causal_lm, load_tokenizer

    tok_S = load_tokenizer(pair["student"], "student")
    tok_T = load_tokenizer(pair["teacher"], "teacher")
    s2t = _student_to_teacher(tok_S, tok_T)
    out: dict[str, dict[str, float]] = {name: {} for name in EVAL_SETS}
    for role in ("teacher", "student"):
        model = load_causal_lm(pair[role], torch.float32, device, key=role)
        for name in EVAL_SETS:
            batches = evals.batches(pair, name, tok_S, seq_len)
            out[name][role] = perplexity(model, _mapped(batches, s2t) if role == "teacher" else batches, device)
        del model
    return out


def margins(ppl: dict) -> dict[str, float]:
    return {name: 1.0 - v["teacher"] / v["student"] for name, v in ppl.items()}


def verdict(ppl: dict, min_margin: float) -> tuple[bool, str]:
    m = margins(ppl)
    ok = m["target_test"] >= min_margin and m["general_test"] >= 0.0
    why = (f"teacher target margin {m['target_test']:+.1%} (need >= {min_margin:.0%}), "
           f"general margin {m['general_test']:+.1%} (need >= 0)")
    return ok, why


def gate_lines(name: str, ppl: dict, min_margin: float) -> list[str]:
    ok, why = verdict(ppl, min_margin)
    lines = [f"[gate] {name}: " + ", ".join(f"{s} teacher {v['teacher']:.2f} / student {v['student']:.2f}"
                                            for s, v in ppl.items())]
    lines.append(f"[gate] {name}: {'PASS' if ok else 'REFUSED'}: {why}")
    return lines
