"""Same-tokenizer against cross-tokenizer supervision: packing time, emission time and bytes per token.

One teacher, SmolLM2-135M-Instruct under the ZeRO-3 teacher engine (real_models.smollm2(), cached), one rank, CPU,
fp32, reads the same documents (the demo's transfer set) for three students that differ only in their tokenizer
and output objective, all D_S = 128 with 2 target layers (so packets differ by the tokenizer alone):
  same       the student uses SmolLM2's tokenizer: the fast path (no alignment tensors), kl top-k
  cross-kl   the demo's 4096-token tokenizer: the teacher reads its own tokens, states and top-k over the shared
             vocabulary gathered at the aligned positions (+ state/out masks), kl
  cross-uld  the same, top-k over the whole teacher vocabulary, no ids (uld)
Per variant: packing time per 1000 student tokens (tokenisation; + teacher tokenisation and alignment across
tokenizers), teacher emission time per 1000 student tokens (median over batches, paired rounds), bytes per student
token of the packet's wire/disk form, and teacher tokens read per student token. M is a random D_S x D_T matrix
(timing and bytes do not depend on its values).

`--variants same --teacher DIR --demo DIR` runs only the same-tokenizer variant through calls that the code
before cross-tokenizer support (commit 001bc12) also has: copy this script into such a checkout and run it there
to compare the fast path's speed before and after.

Usage: OMP_NUM_THREADS=1 python bench/cross_tokenizer_bench.py [--batches 4] [--variants same,cross-kl,cross-uld]
       [--teacher SMOLLM2_DIR] [--demo DEMO_ASSETS_DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from semalign_ds.data import load_texts, pack_sequences  # noqa: E402
from semalign_ds.cluster.launch import free_port  # noqa: E402
from semalign_ds.method.basis import shared_vocabulary  # noqa: E402
from semalign_ds.method.targets import target_recipes  # noqa: E402
from semalign_ds.transport import schema  # noqa: E402

SEQ_LEN, MICRO, TOP_K, D_S = 128, 8, 64, 128


def _engine(path: Path):
    from semalign_ds.engines.ds_config import load_template, teacher_ds_config
    from semalign_ds.engines.teacher import TeacherEngine

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    repo = Path(__file__).resolve().parents[1]
    ds = teacher_ds_config(load_template(repo / "ds_configs" / "teacher_zero3_offload_cpu.json"), offload="cpu",
                           nvme_path=None, bf16=False, micro_batch=MICRO, world_size=1, device="cpu", hidden_size=576)
    return TeacherEngine.from_pretrained(path, ds_config=ds, dtype=torch.float32, device="cpu")


def _pack(texts, tok_S, tok_T, n_blocks: int):
    t0 = time.perf_counter()
    extra = {} if tok_T is None else {"teacher_tokenizer": tok_T}  # the same-tokenizer call of any version
    blocks = pack_sequences(texts, tok_S, SEQ_LEN, n_blocks, **extra)
    return blocks, time.perf_counter() - t0


def _emit(teacher, blocks, i: int, M, recipes, shared, uld: bool):
    rows = slice(i * MICRO, (i + 1) * MICRO)
    ids, mask, sample_ids = blocks.ids_NT[rows], blocks.mask_NT[rows], blocks.sample_ids_N[rows]
    extra = {}
    if getattr(blocks, "align_NT", None) is not None:
        from semalign_ds.engines.teacher import StudentPositions

        extra["student"] = StudentPositions(ids, mask, blocks.align_NT[rows], blocks.exact_NT[rows])
        width = int(blocks.teacher_mask_NU[rows].sum(1).max())  # as supervision.teacher_view trims
        ids, mask = blocks.teacher_ids_NU[rows, :width], blocks.teacher_mask_NU[rows, :width]
    if uld:
        extra["sorted_only"] = True
    t0 = time.perf_counter()
    packet = teacher.emit(ids, mask, sample_ids, recipes, M, top_k=TOP_K, tau=1.0, need_logits=True,
                          target_dtype=torch.bfloat16, logit_ids_T=shared[0] if shared else None,
                          logit_ids_S=shared[1] if shared else None, **extra)
    seconds = time.perf_counter() - t0
    real = int(blocks.mask_NT[rows].sum())
    return seconds, schema.flat_nbytes(schema.packet_to_flat(packet)), real


def _trimmed_width(blocks) -> float:
    """Mean over batches of the teacher positions a batch runs (its longest row)."""
    widths = blocks.teacher_mask_NU.sum(1).reshape(-1, MICRO).max(1).values
    return float(widths.float().mean())


def main() -> None:
    from transformers import AutoTokenizer

    from semalign_ds.demo.assets import build_demo_assets

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--variants", default="same,cross-kl,cross-uld")
    parser.add_argument("--teacher", default=None, help="SmolLM2 folder (default: real_models.smollm2())")
    parser.add_argument("--demo", default=None, help="demo assets folder (default: build_demo_assets())")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.teacher is None:
        from semalign_ds.demo import real_models

        args.teacher = real_models.smollm2()
    demo = Path(args.demo) if args.demo else build_demo_assets(progress=False).cache_dir
    path = Path(args.teacher)
    tok_T, tok_demo = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(demo / "student")
    texts = load_texts({"path": str(demo / "data" / "transfer.jsonl")})
    n_blocks = args.batches * MICRO
    variants = {"same": (tok_T, None, False), "cross-kl": (tok_demo, tok_T, False), "cross-uld": (tok_demo, tok_T, True)}
    variants = {name: variants[name] for name in args.variants.split(",")}
    packed = {}
    for name, (tok_S, tok_teacher, _) in variants.items():
        blocks, seconds = _pack(texts, tok_S, tok_teacher, n_blocks)
        packed[name] = (blocks, seconds / int(blocks.mask_NT.sum()) * 1000)
    teacher = _engine(path)
    M = torch.randn(D_S, 576) / 24
    recipes = target_recipes([10, 20], "layer")
    shared = shared_vocabulary(tok_T, tok_demo, 1000, 49152, len(tok_demo))
    runs = {name: [] for name in variants}
    first = next(iter(variants))
    _emit(teacher, packed[first][0], 0, M, recipes, None, variants[first][2])  # warm-up
    for i in range(args.batches):  # interleaved rounds: the variants see the same machine load
        for name, (_, tok_teacher, uld) in variants.items():
            use_shared = shared if tok_teacher is not None and not uld else None
            runs[name].append(_emit(teacher, packed[name][0], i, M, recipes, use_shared, uld))
    results = {}
    for name, rows in runs.items():
        blocks, pack_ms = packed[name]
        per_k = [s / n * 1000 for s, _, n in rows]
        cross = getattr(blocks, "align_NT", None) is not None
        teacher_tokens = blocks.teacher_mask_NU.sum() if cross else blocks.mask_NT.sum()
        results[name] = {"pack_s_per_1k_tokens": pack_ms, "emit_s_per_1k_tokens": statistics.median(per_k),
                         "bytes_per_token": sum(b for _, b, _ in rows) / sum(n for _, _, n in rows),
                         "teacher_tokens_per_student_token": float(teacher_tokens / blocks.mask_NT.sum()),
                         "teacher_positions_per_student_position": (_trimmed_width(blocks) / SEQ_LEN
                                                                    if cross else 1.0),
                         "exact_fraction": float(blocks.exact_NT[blocks.mask_NT].float().mean()) if cross else 1.0}
    print("| variant | pack (s / 1k student tokens) | emit (s / 1k student tokens, median) | bytes / student token "
          "| teacher tokens / student token | teacher positions run / T | exact positions |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['pack_s_per_1k_tokens']:.3f} | {r['emit_s_per_1k_tokens']:.2f} | "
              f"{r['bytes_per_token']:.0f} | {r['teacher_tokens_per_student_token']:.3f} | "
              f"{r['teacher_positions_per_student_position']:.3f} | {r['exact_fraction']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
