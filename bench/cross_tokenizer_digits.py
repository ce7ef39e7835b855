"""Does the shared-vocabulary KL suppress the student's tokens that the teacher's vocabulary lacks (X-Token, METHOD.md
§9)? The demo's 4096-token tokenizer merges digits ("123"), SmolLM2 splits them, so multi-digit student tokens are
outside the 1:1 string match and get no teacher mass under `kl` except through the tail bucket; `uld` has no such
partition.

For each student checkpoint given (e.g. the demo student before transfer and after `semalign demo --teacher
smollm2` with method.output_objective kl and uld) this prints, on the demo's held-out sets packed as the run packs
them, the mean next-token loss (nats) and mean probability of the correct token, split by the class of that next
token: multi-digit (>= 2 digits, a leading space marker allowed; not shared with SmolLM2), other unshared tokens,
and shared tokens.

Usage: python bench/cross_tokenizer_digits.py NAME=STUDENT_DIR [NAME=STUDENT_DIR ...]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def token_classes(tok_S, tok_T) -> torch.Tensor:
    """Per student id: 0 shared with the teacher, 1 multi-digit (unshared), 2 other unshared."""
    vocab_T = tok_T.get_vocab()
    classes = torch.zeros(len(tok_S), dtype=torch.long)
    for token, i in tok_S.get_vocab().items():
        if token in vocab_T:
            continue
        bare = token.lstrip("Ġ")
        classes[i] = 1 if len(bare) >= 2 and bare.isdigit() else 2
    return classes


@torch.no_grad()
def class_losses(model, blocks, classes: torch.Tensor) -> dict:
    sums = {c: [0.0, 0.0, 0] for c in range(3)}
    for i in range(0, len(blocks), 8):
        ids, mask = blocks.ids_NT[i:i + 8], blocks.mask_NT[i:i + 8]
        logits = model(input_ids=ids, attention_mask=mask.long()).logits.float()[:, :-1]
        nxt, valid = ids[:, 1:], mask[:, :-1] & mask[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), nxt, reduction="none")
        cls = classes[nxt]
        for c in range(3):
            sel = valid & (cls == c)
            sums[c] = [sums[c][0] + float(nll[sel].sum()), sums[c][1] + float(torch.exp(-nll[sel]).sum()),
                       sums[c][2] + int(sel.sum())]
    return {c: (s / max(n, 1), p / max(n, 1), n) for c, (s, p, n) in sums.items()}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from semalign_ds.demo import real_models
    from semalign_ds.data import load_texts, pack_sequences
    from semalign_ds.demo.assets import build_demo_assets

    assets = build_demo_assets(progress=False)
    tok_S, tok_T = AutoTokenizer.from_pretrained(assets.student_path), AutoTokenizer.from_pretrained(
        real_models.smollm2())
    classes = token_classes(tok_S, tok_T)
    names = {0: "shared", 1: "multi-digit (unshared)", 2: "other unshared"}
    print(f"student vocabulary: {int((classes == 0).sum())} shared, {int((classes == 1).sum())} multi-digit, "
          f"{int((classes == 2).sum())} other unshared tokens")
    print("| student | set | " + " | ".join(f"{names[c]}: nats / p (n)" for c in range(3)) + " |")
    print("|---|---|" + "---|" * 3)
    for arg in sys.argv[1:]:
        label, path = arg.split("=", 1)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, file in (("target", assets.target_test_jsonl), ("general", assets.general_test_jsonl)):
            blocks = pack_sequences(load_texts({"path": str(file)}), tok_S, 128, 64)
            row = class_losses(model, blocks, classes)
            cells = " | ".join(f"{row[c][0]:.3f} / {row[c][1]:.4f} ({row[c][2]})" for c in range(3))
            print(f"| {label} | {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
