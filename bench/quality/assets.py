"""The benchmark's models and data: the demo's world plus the extra models of the other pairs, built once and cached.

Main pair: `semalign_ds.demo.assets.build_demo_assets` (stdlib code = general domain for both models, English
documentation = target domain only the teacher pretrains on; one BPE tokenizer; Llama teacher and student).
Extra models, pretrained by the demo's own recipe functions on exactly the demo's rows (same seeds):
- cross_family: a GPT-NeoX teacher of the demo teacher's shape (teacher rows) -> the demo's Llama student;
- cross_tokenizer: a second byte-level BPE tokenizer with a larger vocabulary trained on the same texts (it contains
  every token of the demo tokenizer, checked) and a Llama teacher pretrained with it -> the demo's student. The
  pipeline feeds the teacher the student's token sequence translated into teacher ids;
- mamba: a Mamba (state-space) student pretrained on the student rows <- the GPT-NeoX teacher (a transformer;
  the demo's Llama teacher is worse than this student on the general part, which the gate refuses).
They are cached next to the demo world in quality-<scale>-<key>/ (written to a temporary folder, renamed into
place with a manifest). Shapes: rows_NT (packed int64 token ids), ids_BT, mask_BT.
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

EXTRA_VERSION = 1


def recipe_of(scale: str) -> dict:
    """The demo recipe of a benchmark size: the demo's own scales, or `quality-medium` (the demo's default with
    MEDIUM_RECIPE_CHANGES: a bigger pair for a GPU), passed to the demo as data."""
    from methods import MEDIUM_RECIPE_CHANGES

    if scale == "quality-medium":
        return dict(demo.RECIPES["default"], **MEDIUM_RECIPE_CHANGES)
    return demo.RECIPES[scale]


def main_assets(scale: str, cache_dir, device: str, progress: bool):
    return demo.build_demo_assets(cache_dir=cache_dir, device=device, progress=progress, scale=scale,
                                  recipe=recipe_of(scale))


def _tokenizer(path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def make_model(family: str, spec: dict, vocab_size: int, seq_len: int, tok, seed: int, state: int = 16):
    """A randomly initialised causal LM of `family` (llama | gpt_neox | mamba) with the demo's conventions."""
    import transformers as tr

    if family == "llama":
        return demo.make_llama(spec, vocab_size, seq_len, tok, seed)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "gpt_neox":
        config = tr.GPTNeoXConfig(vocab_size=vocab_size, hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                                  num_attention_heads=spec["heads"], intermediate_size=spec["intermediate"],
                                  max_position_embeddings=4 * seq_len, tie_word_embeddings=False, **ids)
    elif family == "mamba":
        config = tr.MambaConfig(vocab_size=vocab_size, hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                                state_size=state, expand=2, tie_word_embeddings=False, **ids)
    else:
        raise ValueError(f"unknown family {family!r}; use llama, gpt_neox or mamba")
    torch.manual_seed(seed)
    return tr.AutoModelForCausalLM.from_config(config).float()


def demo_rows(recipe: dict, tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher rows, student rows) exactly as the demo pretrains on them, tokenised with `tok`."""
    corpus = demo.load_corpus(demo.stdlib_root(), recipe)
    parts = {dom: demo.split_by_hash(docs, recipe["splits"]) for dom, docs in corpus.items()}
    T = recipe["seq_len"]
    gen_NT = demo.pack(tok, demo.in_hash_order(parts["general"]["train"]), T,
                       max_seqs=recipe["batch"] * recipe["teacher_steps"])
    tgt_NT = demo.pack(tok, demo.in_hash_order(parts["target"]["train"]), T)
    return demo.training_streams(gen_NT, tgt_NT, recipe)


def train_texts(recipe: dict) -> list[str]:
    corpus = demo.load_corpus(demo.stdlib_root(), recipe)
    parts = {dom: demo.split_by_hash(docs, recipe["splits"]) for dom, docs in corpus.items()}
    return [t for _, t in parts["general"]["train"] + parts["target"]["train"]]


def _check_contains(tok_big, tok_small) -> int:
    missing = set(tok_small.get_vocab()) - set(tok_big.get_vocab())
    if missing:
        raise ValueError(f"the cross-tokenizer vocabulary lacks {len(missing)} tokens of the demo tokenizer "
                         f"(e.g. {sorted(missing)[:5]}); the pipeline needs every student token in the teacher's")
    return len(tok_small.get_vocab())


def _pretrain_save(model, rows_NT, recipe, lr, device, name, out: Path, tok, progress: bool) -> dict:
    stats = demo.pretrain(model, rows_NT, recipe, lr, device, f"pretrain {name}", progress)
    model.to("cpu").save_pretrained(out / name)
    tok.save_pretrained(out / name)
    return stats


def _build_extra(out: Path, assets, recipe: dict, extra: dict, device, progress: bool) -> dict:
    from mamba_scan import install

    install()  # transformers' CPU Mamba scan has a quadratic backward; same math, linear (mamba_scan.py)
    tok = _tokenizer(assets.tokenizer_path)
    teacher_rows, student_rows = demo_rows(recipe, tok)
    stats = {}
    neox = make_model("gpt_neox", recipe["teacher"], len(tok), recipe["seq_len"], tok, recipe["seed"])
    stats["cross_family_teacher"] = _pretrain_save(neox, teacher_rows, recipe, recipe["teacher"]["lr"], device,
                                                   "cross_family_teacher", out, tok, progress)
    mamba_spec = dict(recipe["student"], layers=extra["mamba_layers"])
    mamba = make_model("mamba", mamba_spec, len(tok), recipe["seq_len"], tok, recipe["seed"] + 1, extra["mamba_state"])
    stats["mamba_student"] = _pretrain_save(mamba, student_rows, recipe, recipe["student"]["lr"], device,
                                            "mamba_student", out, tok, progress)
    tok_big = demo.train_tokenizer(train_texts(recipe), extra["cross_vocab"], recipe["seq_len"])
    stats["cross_tokenizer_shared"] = _check_contains(tok_big, tok)
    big_rows, _ = demo_rows(recipe, tok_big)
    teacher_big = make_model("llama", recipe["teacher"], len(tok_big), recipe["seq_len"], tok_big, recipe["seed"])
    stats["cross_tokenizer_teacher"] = _pretrain_save(teacher_big, big_rows, recipe, recipe["teacher"]["lr"], device,
                                                      "cross_tokenizer_teacher", out, tok_big, progress)
    return stats


def extra_assets(assets, scale: str, extra: dict, device: str = "cpu", progress: bool = True) -> Path:
    """The extra models for `assets` (cached); returns their folder."""
    recipe = recipe_of(scale)
    key = hashlib.sha256(json.dumps([EXTRA_VERSION, assets.cache_dir.name, extra], sort_keys=True).encode())
    folder = assets.cache_dir.parent / f"quality-{scale}-{key.hexdigest()[:12]}"
    if (folder / "manifest.json").is_file():
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        start = time.perf_counter()
        stats = _build_extra(tmp, assets, recipe, extra, torch.device(device), progress)
        stats["build_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / "manifest.json").write_text(json.dumps({"extra": extra, "stats": stats}, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pair_paths(assets, extra_dir: Path | None) -> dict[str, dict]:
    """name -> {teacher, student, data files} for every pair whose models exist."""
    data = {"transfer": str(assets.transfer_jsonl), "target_val": str(assets.target_val_jsonl),
            "target_test": str(assets.target_test_jsonl), "general_test": str(assets.general_test_jsonl)}
    pairs = {"main": dict(teacher=str(assets.teacher_path), student=str(assets.student_path), **data)}
    if extra_dir is not None:
        pairs["cross_family"] = dict(teacher=str(extra_dir / "cross_family_teacher"), student=pairs["main"]["student"],
                                     **data)
        pairs["cross_tokenizer"] = dict(teacher=str(extra_dir / "cross_tokenizer_teacher"),
                                        student=pairs["main"]["student"], **data)
        # The Mamba student beats the Llama teacher on the general part (it fails the gate's "no worse on
        # general" condition at the small size), so the state-space pair takes the stronger GPT-NeoX teacher.
        pairs["mamba"] = dict(teacher=pairs["cross_family"]["teacher"], student=str(extra_dir / "mamba_student"),
                              **data)
    return pairs
