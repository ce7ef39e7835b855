"""Speed and memory of the compact packet codec, each against a baseline measured in the same run.

(1) encode / teacher pass: the teacher's forward over a micro-batch (states of the paired layers, logits, top-k and
    tail: what a pass emits) against codec.encode of the packet it yields (goal <= 0.05);
(2) decode / student step: a student training step (forward, every layer trainable, backward, AdamW) against
    codec.decode of the packet it trains on (goal <= 0.05);
(3) the colocated windowed store's peak at N and 4N sequences (`semalign run`, transport.scope window; MLflow's
    store_peak_bytes): equal within one window (goal: equal).
Shapes (CPU): teacher SmolLM2-135M's (30 x 576, 49,152 tokens; random weights: the compute is the shape's), student
6 x 576 with the same vocabulary, 8 x 256 tokens per micro-batch, 6 paired layers, top-64; codec rank 32, 8 bits.
The spool's write and read against `dd` are bench/transport_bench.py's (same run, same file system).

Usage: python bench/codec_bench.py [--quick] [--json OUT]   (prints a markdown table)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from semalign_ds.engines.teacher import topk_tail  # noqa: E402
from semalign_ds.spec import id_bytes  # noqa: E402
from semalign_ds.transport import schema  # noqa: E402
from semalign_ds.transport.codec import BasisFit, Codec, fit_bases  # noqa: E402
from semalign_ds.transport.packet import SupervisionPacket  # noqa: E402

FULL = {"B": 8, "T": 256, "teacher_layers": 30, "student_layers": 6, "D": 576, "V": 49152, "K": 64, "repeats": 5}
QUICK = {"B": 2, "T": 64, "teacher_layers": 4, "student_layers": 2, "D": 128, "V": 4096, "K": 16, "repeats": 2}


def llama(layers: int, shape: dict):
    import transformers as tr

    config = tr.LlamaConfig(hidden_size=shape["D"], intermediate_size=int(shape["D"] * 8 / 3), num_hidden_layers=layers,
                            num_attention_heads=9 if shape["D"] == 576 else 4,
                            num_key_value_heads=3 if shape["D"] == 576 else 2, vocab_size=shape["V"],
                            max_position_embeddings=2 * shape["T"], tie_word_embeddings=True)
    torch.manual_seed(0)
    return tr.LlamaForCausalLM(config).float()


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def teacher_pass(teacher, ids, shape: dict) -> SupervisionPacket:
    """The forward a teacher pass runs and the packet it yields (targets: the paired layers' residuals)."""
    with torch.no_grad():
        out = teacher(input_ids=ids, output_hidden_states=True)
        values, idx, tail = topk_tail(out.logits, shape["K"], 1.0)
    hs = out.hidden_states
    step = max(1, (len(hs) - 1) // shape["student_layers"])
    targets = {k: (hs[k * step] - hs[k * step - 1]).float() for k in range(1, shape["student_layers"] + 1)}
    targets = {k: t / t.norm(dim=-1, keepdim=True).clamp_min(1e-6) for k, t in targets.items()}
    return SupervisionPacket(ids_BT=ids, mask_BT=torch.ones_like(ids, dtype=torch.bool),
                             sample_ids_B=torch.arange(ids.shape[0]), targets=targets, top_values_BTK=values,
                             top_idx_BTK=idx, tail_BT=tail)


def fitted(packet: SupervisionPacket, shape: dict) -> Codec:
    fit = BasisFit()
    fit.add(packet.targets, packet.mask_BT)
    ranks, means, bases, energy = fit_bases(fit, 32, None)
    return Codec("compact", 8, 8, id_bytes(shape["V"]), ranks, means, bases, energy)


def student_step(student, opt, packet: SupervisionPacket) -> float:
    """One full training step of the student on the packet's tokens (the decoded packet's cost is apart)."""
    out = student(input_ids=packet.ids_BT)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), packet.ids_BT[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss)


def bench_codec(shape: dict) -> dict:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    teacher, student = llama(shape["teacher_layers"], shape), llama(shape["student_layers"], shape)
    ids = torch.randint(0, shape["V"], (shape["B"], shape["T"]), generator=torch.Generator().manual_seed(1))
    r = shape["repeats"]
    teach_s, packet = timed(lambda: teacher_pass(teacher, ids, shape), r)
    codec = fitted(packet, shape)
    flat = schema.packet_to_flat(packet)
    encode_s, enc = timed(lambda: codec.encode(flat), r)
    decode_s, _ = timed(lambda: codec.decode(enc, torch.float32), r)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    step_s, _ = timed(lambda: student_step(student, opt, packet), r)
    return {"teacher_pass_s": teach_s, "encode_s": encode_s, "student_step_s": step_s, "decode_s": decode_s,
            "lossless_bytes": schema.flat_nbytes(flat), "compact_bytes": schema.flat_nbytes(enc),
            "tokens": shape["B"] * shape["T"]}


def bench_store_peak(quick: bool) -> dict:
    """Two windowed colocated runs on the tiny pair, N and 4N sequences: MLflow's store_peak_bytes of each."""
    import mlflow
    import yaml

    from conftest import make_tiny_pair

    tmp = Path(tempfile.mkdtemp(prefix="codec-bench-"))
    pair = make_tiny_pair(tmp / "pair")
    out = {}
    for n in (12, 48):
        raw = {"name": f"peak{n}", "output_dir": str(tmp / f"run{n}"),
               "teacher": {"path": str(pair["teacher"]), "dtype": "float32"},
               "student": {"path": str(pair["student"]), "dtype": "float32"},
               "data": {"path": str(pair["train"]), "seq_len": 64, "max_sequences": n, "micro_batch_size": 4},
               "method": {"top_k": 8, "min_shared_tokens": 100, "target_dtype": "float32"},
               "schedule": {"mode": "full", "epochs_per_stage": 0.5, "warmup_steps": 1},
               "transport": {"scope": "window", "window_sequences": 12},
               "runtime": {"device": "cpu", "progress": False}}
        cfg = tmp / f"c{n}.yaml"
        cfg.write_text(yaml.safe_dump(raw))
        subprocess.run([sys.executable, "-m", "semalign_ds.cli", "run", "--config", str(cfg)], check=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=900)
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / f'run{n}' / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("semalign").experiment_id])
        out[n] = {k: run.data.metrics[k] for k in ("store_peak_bytes", "teacher_passes_per_sample",
                                                    "packet_bytes_per_token")}
    return out


def report(c: dict, peak: dict, shape: dict) -> str:
    rows = [("encode / teacher pass", f"{1e3 * c['encode_s']:.1f} ms", f"{1e3 * c['teacher_pass_s']:.0f} ms",
             f"{c['encode_s'] / c['teacher_pass_s']:.4f}", "<= 0.05"),
            ("decode / student step", f"{1e3 * c['decode_s']:.1f} ms", f"{1e3 * c['student_step_s']:.0f} ms",
             f"{c['decode_s'] / c['student_step_s']:.4f}", "<= 0.05"),
            (f"packet bytes per token ({shape['student_layers']} layers of {shape['D']}, top-{shape['K']})",
             f"{c['compact_bytes'] / c['tokens']:.0f}",
             f"lossless {c['lossless_bytes'] / c['tokens']:.0f}",
             f"{c['compact_bytes'] / c['lossless_bytes']:.4f}", "-"),
            ("windowed store peak, N = 12 vs 4N = 48 sequences", f"{peak[48]['store_peak_bytes']:,.0f} B",
             f"{peak[12]['store_peak_bytes']:,.0f} B", f"{peak[48]['store_peak_bytes'] / peak[12]['store_peak_bytes']:.3f}",
             "1.000")]
    lines = [f"Shapes: {shape}", "", "| measure | codec | baseline (same run) | ratio | goal |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shape = QUICK if args.quick else FULL
    c = bench_codec(shape)
    peak = bench_store_peak(args.quick)
    print(report(c, peak, shape))
    if args.json:
        Path(args.json).write_text(json.dumps({"codec": c, "store_peak": peak, "shape": shape}, indent=1))


if __name__ == "__main__":
    main()
