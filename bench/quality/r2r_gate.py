"""The real-to-real pairs' models and data, and their gate: both models' bits per byte on every held-out set (the
teacher on its own tokens of the same text, BOS first where it reads after one), the alignment's coverage, and
both models' stdlib_keyword accuracy; cached as <out>/gate/<pair>.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SETS = ("target_val", "target_test", "general_test")


def _folder(name: str, assets) -> str:
    from semalign_ds.demo import real_models

    if name == "demo-student":
        return str(assets.student_path)
    if name == "demo-teacher":
        return str(assets.teacher_path)
    return str(real_models.fetch(name))


def pair_paths(pair) -> dict:
    """{teacher, student, transfer, target_val, target_test, general_test, replay}: folders and JSONL files."""
    from semalign_ds.demo.assets import build_demo_assets, general_replay_jsonl

    assets = build_demo_assets(device="cpu", progress=False, scale="default")
    return {"teacher": _folder(pair.teacher, assets), "student": _folder(pair.student, assets),
            "transfer": str(assets.transfer_jsonl), "target_val": str(assets.target_val_jsonl),
            "target_test": str(assets.target_test_jsonl), "general_test": str(assets.general_test_jsonl),
            "replay": str(general_replay_jsonl(assets))}


@torch.no_grad()
def _nats(model, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """Summed next-token NLL, one row at a time (a 262k-vocabulary head's logits stay one row wide)."""
    from semalign_ds.evaluation.evaluate import model_logits, next_token_loss_sum

    total = 0.0
    for i in range(len(ids_BT)):
        width = max(int(mask_BT[i].sum()), 1)
        ids, mask = ids_BT[i:i + 1, :width], mask_BT[i:i + 1, :width]
        total += next_token_loss_sum(model_logits(model, ids, mask), ids, mask)[0]
    return total


def _set_bpb(paths: dict, name: str, models: dict, toks: dict, budget) -> tuple[dict, float, float]:
    from semalign_ds import data as datamod
    from semalign_ds.evaluation.evaluate import _block_bytes, bits_per_byte

    texts = datamod.load_texts({"path": paths[name], "format": "auto", "text_field": "text"}, name)
    blocks = datamod.pack_sequences(texts, toks["student"], budget.seq_len, budget.eval_sequences,
                                    teacher_tokenizer=toks["teacher"])
    s_bytes, t_bytes = _block_bytes(texts, blocks, toks["student"], toks["teacher"])
    out = {"student": bits_per_byte(_nats(models["student"], blocks.ids_NT, blocks.mask_NT), int(s_bytes.sum())),
           "teacher": bits_per_byte(_nats(models["teacher"], blocks.teacher_ids_NU, blocks.teacher_mask_NU),
                                    int(t_bytes.sum()))}
    real = blocks.mask_NT
    return out, float((real & (blocks.align_NT >= 0)).sum() / real.sum()), float((real & blocks.exact_NT).sum()
                                                                                  / real.sum())


def gate(out: Path, name: str, paths: dict, budget) -> dict:
    """The pair's gate (computed once, cached as <out>/gate/<name>.json)."""
    from semalign_ds.evaluation import keyword_task
    from semalign_ds.method.basis import shared_vocabulary
    from semalign_ds.models.loading import load_causal_lm, load_tokenizer

    path = out / "gate" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    toks = {r: load_tokenizer(paths[r], r) for r in ("teacher", "student")}
    models = {r: load_causal_lm(paths[r], torch.float32, "cpu", key=r) for r in ("teacher", "student")}
    result = {"bpb": {}, "task": {}}
    for s in SETS:
        result["bpb"][s], aligned, exact = _set_bpb(paths, s, models, toks, budget)
        if s == "target_test":
            result["aligned"], result["exact"] = aligned, exact
    items = keyword_task.build_items()
    for role in ("teacher", "student"):
        got = keyword_task.score_items(models[role], toks[role], items)
        result["task"][role] = {**got, "ci95": 1.96 * got["acc_stderr"]}
    result["shared"] = int(shared_vocabulary(toks["teacher"], toks["student"], 1)[0].numel())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result
