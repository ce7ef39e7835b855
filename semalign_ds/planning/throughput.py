"""Throughput: the cost model of a run (shapes, FLOPs, bytes, device ceilings) and the metrics a run logs.

Cost model (shared/DESIGN.md "Cost model"): under ZeRO-3 parameter offload every teacher forward streams all
teacher weights once, whatever the batch, so a pass takes
    max(forward FLOPs / (matmul peak x forward efficiency), shard bytes / host->device GB/s,
        all-gathered bytes / interconnect GB/s)
(transfers overlap compute; measured on one H200 with DeepSpeed 0.19.8 (docs/BENCHMARKS.md): 55 GB/s pinned PCIe,
791 TFLOP/s bf16, forward efficiency ~0.71; at >= 32k tokens per pass the offload was hidden, at 16k it cost
5-50% more than this model says). A student stage step costs its forward, the input gradients from the head down
to the frontier layer k and layer k's weight gradients, plus AdamW over the trainable parameters.
Memory is a sum of named parts; each DeviceProfile says where its constants come from. `semalign plan`
(plan.py) applies this to a config; `RunMeter` measures the same quantities in a run for MLflow.
Legend: n tokens per rank per micro-step (B x T), P parameters, D hidden, I MLP width, V vocabulary, W ranks;
sizes in bytes unless a name says GiB.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GATED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


@dataclass(frozen=True)
class DeviceProfile:
    """Ceilings of one accelerator (or the CPU) and its host; `source` says where each figure comes from."""

    name: str
    matmul_tflops: dict[str, float]  # dense matmul peak per compute dtype
    forward_efficiency: float  # fraction of the matmul peak an eager teacher forward reaches
    student_efficiency: float  # the same for a student training step
    h2d_gbps: float  # pinned host->device copy (PCIe); memcpy on the CPU
    mem_gbps: float  # device memory bandwidth (optimizer steps)
    interconnect_gbps: float  # all-gather bandwidth per device inside a node
    network_gbps: float  # all-gather bandwidth per device between nodes
    nvme_gbps: float  # NVMe read per device (offload=nvme)
    device_mem_gib: float
    host_mem_gib_per_device: float
    rank_overhead_gib: float  # runtime context + allocator slack per rank on the device
    host_overhead_gib: float  # Python, torch, DeepSpeed per rank on the host
    unified: bool  # device memory is host memory (CPU): one budget
    fp64_tflops: float  # float64 matmul (the semantic bases' Gram matrices)
    act_frozen: tuple[float, float]  # saved activations per token per frozen layer: a*D + b*I elements
    act_trainable: tuple[float, float]  # the same for a trainable layer
    source: str


PROFILES = {
    "h200": DeviceProfile(
        "h200", {"bfloat16": 791.0, "float16": 791.0, "float32": 60.0}, 0.68, 0.5, 55.0, 4000.0, 360.0, 50.0, 6.0,
        139.0, 256.0, 3.0, 6.0, False, 30.0, (6.0, 3.0), (9.0, 4.0),
        "measured on one H200 (docs/BENCHMARKS.md, 2026-11): bf16 matmul 791 TFLOP/s, pinned H2D 55 GB/s, forward efficiency 0.68 "
        "(8B at 65k tokens 1.91 s, 70B ~4.0k tok/s, against forward_flops: the issue's 0.71 counted embeddings); "
        "assumed (not measured here): student efficiency 0.5, fp32 60 TFLOP/s, HBM 4 TB/s, NVLink all-gather "
        "360 GB/s, 50 GB/s per GPU between nodes, NVMe 6 GB/s, 256 GiB host RAM per GPU (8-GPU node, 2 TiB), "
        "fp64 matmul 30 TFLOP/s (under half the 67 TFLOP/s FP64 tensor-core spec)"),
    "h100": DeviceProfile(
        "h100", {"bfloat16": 989.0, "float16": 989.0, "float32": 60.0}, 0.65, 0.5, 55.0, 3300.0, 360.0, 50.0, 6.0,
        79.0, 256.0, 3.0, 6.0, False, 30.0, (6.0, 3.0), (9.0, 4.0),
        "H100 SXM spec sheet (989 TFLOP/s bf16 dense, 80 GB); efficiencies assumed, not measured here"),
    "cpu": DeviceProfile(
        "cpu", {"float32": 0.095, "bfloat16": 0.024, "float16": 0.024}, 0.62, 0.55, 30.0, 30.0, 5.0, 1.0, 1.0,
        24.0, 0.0, 0.0, 0.75, True, 0.04, (6.0, 3.0), (9.0, 4.0),
        "calibrated on the 2-core CPU VM, 1 thread, 2026-11-28 by bench/throughput/cpu_bench.py: fp32 matmul "
        "95 GFLOP/s (best; 26-95 under the VM's load), memcpy 32 GB/s, teacher forward efficiency 0.62, student "
        "step efficiency 0.55; bf16 matmul assumed 4x slower than fp32, fp64 matmul 40 GFLOP/s (not measured); "
        "runtime 0.75 GiB per process: the peak RSS of a tiny colocated `semalign run` (torch, DeepSpeed, "
        "transformers, MLflow), 2026-11-30"),
}


def peak_rss_bytes() -> float:
    """Peak resident set of this process image. Linux: VmHWM of /proc/self/status, which starts afresh at exec;
    ru_maxrss does not (the kernel carries the pre-exec image's peak across exec, so a child spawned by a large
    process reports its parent's peak). Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss) if sys.platform == "darwin" else rss * 1024.0


def get_profile(name: str) -> DeviceProfile:
    if name not in PROFILES:
        raise ValueError(f"--device-profile {name!r} is unknown; use one of {', '.join(sorted(PROFILES))} (or add "
                         "one to semalign_ds.planning.plan.PROFILES)")
    return PROFILES[name]


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only LM's shape, from its config (no weights). An attention-free family (Mamba) has heads 0: its
    cost is estimated from the MLP-shaped terms alone (a rough figure; the packets need only layers, hidden and
    vocab, which are exact)."""

    layers: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated: bool

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        D, H = int(text.hidden_size), int(getattr(text, "num_attention_heads", None) or 0)  # 0: no attention (Mamba)
        head_dim = getattr(text, "head_dim", None) or (D // H if H else 0)
        return cls(int(text.num_hidden_layers), D, int(getattr(text, "intermediate_size", None) or 4 * D), H,
                   int(getattr(text, "num_key_value_heads", None) or H), int(head_dim), int(text.vocab_size),
                   bool(getattr(text, "tie_word_embeddings", False)), getattr(text, "model_type", "") in GATED_FAMILIES)

    @property
    def layer_params(self) -> int:
        D, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return D * q + 2 * D * kv + q * D + (3 if self.gated else 2) * D * self.inter + 2 * D

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        return self.layers * self.layer_params + self.embed_params + self.head_params + self.hidden

    @property
    def matmul_params(self) -> int:
        """Weights a token multiplies through in a forward (the head counts even when tied)."""
        return self.layers * self.layer_params + self.vocab * self.hidden


def forward_flops(shape: ModelShape, B: int, T: int, layers: int | None = None) -> float:
    """2 x weights x tokens + causal attention (2 T^2 x heads x head_dim per layer and sequence)."""
    L = shape.layers if layers is None else layers
    weights = L * shape.layer_params + shape.vocab * shape.hidden
    return 2.0 * weights * B * T + 2.0 * B * T * T * shape.heads * shape.head_dim * L


def teacher_pass_seconds(shape: ModelShape, B: int, T: int, dtype_bytes: int, prof: DeviceProfile, *, world: int,
                         nodes: int, offload: str, dtype: str) -> dict[str, float]:
    """One teacher forward per rank: compute, host->device (or NVMe) and all-gather times; pass = their max."""
    compute = forward_flops(shape, B, T) / (prof.matmul_tflops[dtype] * 1e12 * prof.forward_efficiency)
    weights = shape.total_params * dtype_bytes
    link = {"cpu": prof.h2d_gbps, "nvme": prof.nvme_gbps}.get(offload)
    fetch = weights / world / (link * 1e9) if link else 0.0
    bw = prof.interconnect_gbps if nodes == 1 else prof.network_gbps
    gather = weights * (world - 1) / world / (bw * 1e9) if world > 1 else 0.0
    return {"compute_s": compute, "fetch_s": fetch, "gather_s": gather, "pass_s": max(compute, fetch, gather)}


def student_step_flops(shape: ModelShape, B: int, T: int, k: int, full: bool = False) -> float:
    """Forward + input gradients from the head down to layer k (to layer 1 when full) + trainable weight grads."""
    n, fwd = B * T, forward_flops(shape, B, T)
    above = shape.layers if full else shape.layers - k + 1
    back = forward_flops(shape, B, T, layers=above)
    weights = 2.0 * n * (shape.matmul_params if full else shape.layer_params)
    return fwd + back + weights


def student_step_seconds(shape: ModelShape, B: int, T: int, k: int, prof: DeviceProfile, dtype: str,
                         full: bool = False) -> float:
    trainable = shape.total_params if full else shape.layer_params
    optimizer = 40.0 * trainable / (prof.mem_gbps * 1e9)  # AdamW + ZeRO-2 copies: ~40 bytes moved per parameter
    return student_step_flops(shape, B, T, k, full) / (prof.matmul_tflops[dtype] * 1e12 * prof.student_efficiency) \
        + optimizer


def _activations(shape: ModelShape, n: int, coeff: tuple[float, float], elem: int) -> float:
    return n * (coeff[0] * shape.hidden + coeff[1] * shape.inter) * elem


def logits_bytes(n: int, V: int, elem: int, top_k: int, unified: bool) -> float:
    """Peak bytes of the student's logits and output loss in a step."""
    if top_k:  # engines/kl_lean.py: the logits, their gradient, two float32 temporaries of one row chunk
        chunk_elements = min(n * V, 2**22 if unified else 2**28)  # kl_lean.CHUNK_ELEMENTS (cpu / cuda)
        return n * V * 2.0 * elem + chunk_elements * 8.0
    return n * V * (elem + 20.0)  # objectives.kl_full on full logits: float32 copies, log-softmaxes, gradients


def student_memory(shape: ModelShape, B: int, T: int, k: int, elem: int, world: int, top_k: int,
                   prof: DeviceProfile, full: bool = False, lora_params: int | None = None) -> dict[str, float]:
    """Peak bytes of one student rank in a stage step (ZeRO-2; AdamW state partitioned over `world`)."""
    n = B * T
    trainable = shape.total_params if full else (lora_params or shape.layer_params)
    frozen_layers = 0 if full else shape.layers - k
    trained_layers = shape.layers if full else 1
    acts = (frozen_layers * _activations(shape, n, prof.act_frozen, elem)
            + trained_layers * _activations(shape, n, prof.act_trainable, elem))
    parts = {"weights": shape.total_params * elem, "gradients": trainable * (elem + 4.0 / world),
             "optimizer_state": trainable * 12.0 / world,  # fp32 master + Adam m and v
             "activations": acts, "logits_and_loss": logits_bytes(n, shape.vocab, elem, top_k, prof.unified)}
    parts["total"] = sum(parts.values())
    return parts


def teacher_memory(shape: ModelShape, n: int, elem: int, world: int, offload: str, captured: int,
                   need_logits: bool, student_targets: int) -> dict[str, float]:
    """Device bytes of one teacher rank during a pass, and the host bytes of its offloaded shard."""
    D, I = shape.hidden, shape.inter
    shard = shape.total_params * elem / world
    gathered = (max(shape.layer_params, shape.embed_params) + 0.9 * D * D) * elem  # one module + prefetch bucket
    layer_tmp = n * (5 * D + 3 * I) * elem
    logits = n * shape.vocab * (elem + 12) if need_logits else 0.0  # logits, fp32 copy, /tau, log-softmax
    parts = {"teacher_shard": 0.0 if offload != "none" else shard, "teacher_working_set": gathered,
             "teacher_captured_states": captured * n * D * elem, "teacher_targets": student_targets,
             "teacher_transient": max(layer_tmp, logits)}
    parts["total"] = sum(parts.values())
    parts["host_shard"] = shard if offload == "cpu" else 0.0
    return parts


def attribution_memory(shape: ModelShape, n: int, elem: int) -> float:
    """Teacher forward+backward for layer attribution: activations of every layer kept (frozen weights)."""
    return shape.layers * n * (6 * shape.hidden + 3 * shape.inter) * elem + n * shape.vocab * (elem + 8)




# ---- what a run measures (MLflow) ----

def teacher_param_bytes(model) -> int:
    """Bytes of all teacher parameters (full sizes: ZeRO-3 partitions keep theirs in ds_numel)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in model.parameters())


class RunMeter:
    """Times the packet source (a store, spool or stream read) and the student's step inside a stage.

    Rank-local timings (the device is synchronised after each call so GPU work is charged to the right side);
    rates are scaled by the world size. `flush()` returns the step's metrics and starts afresh:
    source_tokens_per_s (the read or receive rate), student_tokens_per_s, bytes_per_token_moved (packet bytes per
    real token). The teacher's own rates are measured in the teach phase (pipeline._log_teach).
    """

    def __init__(self, device, world_size: int):
        self.device, self.world_size = device, int(world_size)
        self.reset()

    @classmethod
    def for_run(cls, ctx) -> "RunMeter":
        return cls(ctx.info.device, ctx.info.world_size)

    def reset(self) -> None:
        self.t_source = self.t_student = 0.0
        self.reads = self.tokens = self.packet_bytes = 0

    def _sync(self) -> None:
        if getattr(self.device, "type", str(self.device)) == "cuda":
            import torch

            torch.cuda.synchronize()

    def source(self, fetch, *args):
        """packet = fetch(*args) (e.g. next(packets, None)), timed; a None packet is not counted."""
        t0 = time.perf_counter()
        packet = fetch(*args)
        self._sync()
        if packet is not None:
            self.t_source += time.perf_counter() - t0
            self.reads += 1
            self.packet_bytes += packet.nbytes()
        return packet

    def student(self, step, packet):
        """metrics = step(packet), timed."""
        t0 = time.perf_counter()
        out = step(packet)
        self._sync()
        self.t_student += time.perf_counter() - t0
        self.tokens += packet.num_tokens
        return out

    def flush(self) -> dict[str, float]:
        tokens, out = max(self.tokens, 1), {}
        if self.reads and self.t_source > 0:
            out["source_tokens_per_s"] = self.world_size * tokens / self.t_source
            out["bytes_per_token_moved"] = self.packet_bytes / tokens
        if self.t_student > 0:
            out["student_tokens_per_s"] = self.world_size * tokens / self.t_student
        self.reset()
        return out


def map_build(teacher: ModelShape, student: ModelShape, shared: int, prof: DeviceProfile,
              chunk: int = 16384) -> dict[str, float]:
    """Time and peak bytes of the semantic bases and M, built once per run on one device (run/mapping.build_map;
    method/basis.output_basis): per model a float64 Gram matrix over vocabulary chunks V D^2, an eigendecomposition
    and the Gram pseudo-inverse ~12 D^3, and the basis columns 2 D^2 V (chunked again), then M over the shared
    vocabulary 2 D_S V' D_T in float32. Memory: both gathered heads and both float32 bases (V x D each), the
    allocator's slack while the larger basis is built (about one more V x D float32: measured), and a few
    chunk x D float64 blocks; nothing V x V. Measured by bench/throughput/map_build_bench.py: Gemma 3 270M
    (262,144 x 640) -> SmolLM2-135M (49,152 x 576), 46,146 shared tokens, 2-core CPU, 1 thread: the teacher's
    basis added 1.35 GiB at its peak, the student's 0.29 GiB, M nothing measurable; the process peaked at
    2.24 GiB (0.4 of it the Python/torch runtime); this formula gives 2.3 GiB."""
    fp64 = sum(2.0 * m.vocab * m.hidden ** 2 + 12.0 * m.hidden ** 3 + 2.0 * m.hidden ** 2 * m.vocab
               for m in (teacher, student))
    fp32 = 2.0 * student.hidden * shared * teacher.hidden
    seconds = fp64 / (prof.fp64_tflops * 1e12) + fp32 / (prof.matmul_tflops["float32"] * 1e12)
    tables = [m.vocab * m.hidden for m in (teacher, student)]
    peak = 4.0 * 2 * sum(tables) + 4.0 * max(tables) + 3 * 8.0 * chunk * max(teacher.hidden, student.hidden)
    return {"seconds": seconds, "peak_bytes": peak}
