"""The real pairs of the quality benchmark (issue 11): SmolLM2-135M as the teacher, three students, cached once.

Data: the demo's world (semalign_ds.demo.assets, default scale): transfer = English documentation (the target domain),
target_val / target_test from the same domain, general_test = stdlib code.
Students:
- code: a small Llama with SmolLM2's tokenizer (tied embeddings), pretrained here on exactly the demo student's
  rows (stdlib code, re-tokenised with SmolLM2's tokenizer) by the demo's own recipe functions; much narrower and
  shallower than the teacher (`CODE_STUDENT`);
- pruned: SmolLM2 itself with only `PRUNED_LAYERS` of its 30 decoder layers kept (same tokenizer);
- demo: the demo's 4096-token student (a different tokenizer: cross-tokenizer transfer).
Built into <cache>/quality-real-<key>/ (temporary folder, renamed into place with a manifest).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from semalign_ds.demo import assets as demo

REAL_VERSION = 1
CODE_STUDENT = dict(layers=3, hidden=192, heads=3, kv_heads=3, intermediate=512, lr=3e-3)
PRUNED_LAYERS = (0, 1, 28, 29)  # SmolLM2's first two and last two decoder layers (0-indexed)


def smollm2_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def code_student(tok, recipe: dict):
    """A randomly initialised small Llama with SmolLM2's vocabulary and special tokens (tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = CODE_STUDENT
    config = LlamaConfig(vocab_size=len(tok), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         intermediate_size=s["intermediate"], max_position_embeddings=4 * recipe["seq_len"],
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    torch.manual_seed(recipe["seed"] + 11)
    return LlamaForCausalLM(config).float()


def pruned_smollm2(teacher: Path, out: Path) -> dict:
    """SmolLM2 with PRUNED_LAYERS only (weights copied), saved with its tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in PRUNED_LAYERS])
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(PRUNED_LAYERS)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in PRUNED_LAYERS]
    model.save_pretrained(out)
    smollm2_tokenizer(teacher).save_pretrained(out)
    return {"kept_layers": list(PRUNED_LAYERS), "params": sum(p.numel() for p in model.parameters())}


def _build(out: Path, teacher: Path, assets, progress: bool) -> dict:
    recipe = demo.RECIPES["default"]
    tok = smollm2_tokenizer(teacher)
    import assets as assetsmod  # bench/quality/assets.py: the demo's rows re-tokenised

    _, student_rows = assetsmod.demo_rows(recipe, tok)
    model = code_student(tok, recipe)
    stats = {"code_student": demo.pretrain(model, student_rows, recipe, CODE_STUDENT["lr"], torch.device("cpu"),
                                           "pretrain code student (SmolLM2 tokenizer)", progress)}
    model.save_pretrained(out / "code_student")
    tok.save_pretrained(out / "code_student")
    stats["pruned"] = pruned_smollm2(teacher, out / "pruned")
    return stats


def real_assets(cache_dir=None, progress: bool = True) -> dict:
    """{teacher, code_student, pruned, demo_student, data files...}: paths, built once."""
    from semalign_ds.demo.real_models import smollm2

    teacher = smollm2()
    assets = demo.build_demo_assets(cache_dir=cache_dir, device="cpu", progress=progress, scale="default")
    key = hashlib.sha256(json.dumps([REAL_VERSION, CODE_STUDENT, PRUNED_LAYERS, str(teacher),
                                     assets.cache_dir.name], sort_keys=True).encode()).hexdigest()[:12]
    folder = assets.cache_dir.parent / f"quality-real-{key}"
    if not (folder / "manifest.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
        try:
            start = time.perf_counter()
            with demo._build_env(2, progress):
                stats = _build(tmp, teacher, assets, progress)
            stats["build_seconds"] = round(time.perf_counter() - start, 1)
            (tmp / "manifest.json").write_text(json.dumps({"stats": stats}, indent=1))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    data = {"transfer": str(assets.transfer_jsonl), "target_val": str(assets.target_val_jsonl),
            "target_test": str(assets.target_test_jsonl), "general_test": str(assets.general_test_jsonl)}
    return {"code": dict(teacher=str(teacher), student=str(folder / "code_student"), **data),
            "pruned": dict(teacher=str(teacher), student=str(folder / "pruned"), **data),
            "demo": dict(teacher=str(teacher), student=str(assets.student_path), **data)}


def dry_assets(cache_dir=None) -> dict:
    """The plumbing check (--dry): the tiny demo world's teacher and student as the `code` pair (no SmolLM2)."""
    assets = demo.build_demo_assets(cache_dir=cache_dir, device="cpu", progress=False, scale="tiny")
    data = {"transfer": str(assets.transfer_jsonl), "target_val": str(assets.target_val_jsonl),
            "target_test": str(assets.target_test_jsonl), "general_test": str(assets.general_test_jsonl)}
    return {"code": dict(teacher=str(assets.teacher_path), student=str(assets.student_path), **data)}
