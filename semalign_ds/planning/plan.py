"""`semalign plan --config X --nodes N --gpus-per-node G`: predict a run before a cluster week is spent on it.

Reads both models' config.json only (no weights) and applies the cost model in throughput.py: per-rank device
memory (teacher working set and activations, the packet, student weights, the frontier layer's gradients and
optimizer state, student activations and logits), attribution on its own micro-batch, the one-off build of the
semantic bases and M, host memory per node (the offloaded teacher shards and the packet store), teacher tokens/s
and tokens per weight pass, the stages' steps and tokens (budget.py, the same numbers the run uses, with
data.max_sequences sequences), one teacher pass per sample, wall time, and the packets' bytes. It says plainly
when the run will not fit and which setting to change. `--device-profile` picks the ceilings (h200 by default;
cpu for runtime.device=cpu); `--json` prints the figures; exit status 0 when it fits, 1 when it does not.
Legend: n tokens per rank per micro-step (micro_batch_size x seq_len), W ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING

from semalign_ds import spec as specmod
from semalign_ds.planning import throughput as tp
from semalign_ds.planning.throughput import DTYPE_BYTES, GiB, ModelShape, get_profile
from semalign_ds.spec import Roles, RunSpec

if TYPE_CHECKING:
    from semalign_ds.config import RunConfig

@dataclass
class Plan:
    """Everything `semalign plan` predicts for one config and cluster shape; render() prints it."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return not self.problems

    def add(self, label: str, value: str, key: str | None = None, number: float | None = None) -> None:
        self.lines.append((label, value))
        if key is not None:
            self.figures[key] = number

    def render(self) -> str:
        width = max(len(label) for label, _ in self.lines)
        out = [f"{label:<{width}}  {value}" for label, value in self.lines]
        verdict = "FITS" if self.fits else "WILL NOT FIT"
        out += ["", f"verdict: {verdict}"] + [f"  - {p}" for p in self.problems]
        out += [f"  * {a}" for a in self.advice]
        return "\n".join(out)


def gib(x: float) -> str:
    return f"{x / GiB:,.1f} GiB"


def rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:.1f} days"



@dataclass(frozen=True)
class Setup:
    """The run's RunSpec (spec.resolve: the same one the run builds) on a cluster shape, and the cost model's
    shorthands for it."""

    spec: RunSpec
    gpus: int

    teacher = property(lambda self: self.spec.teacher)
    student = property(lambda self: self.spec.student)
    budget = property(lambda self: self.spec.budget)
    B = property(lambda self: self.spec.cfg.data.micro_batch_size)
    T = property(lambda self: self.spec.cfg.data.seq_len)
    nodes = property(lambda self: self.spec.roles.nodes)
    t_world = property(lambda self: len(self.spec.roles.teacher_ranks))
    s_world = property(lambda self: len(self.spec.roles.student_ranks))
    stages = property(lambda self: tuple(s.k for s in self.spec.budget.stages))
    attr_B = property(lambda self: self.spec.cfg.pairing.attribution_micro_batch or self.B)
    tb = property(lambda self: DTYPE_BYTES[self.spec.cfg.teacher.dtype])
    sb = property(lambda self: DTYPE_BYTES[self.spec.cfg.student.dtype])
    target_b = property(lambda self: DTYPE_BYTES[self.spec.cfg.method.target_dtype])
    top_k = property(lambda self: self.spec.cfg.method.top_k)
    need_logits = property(lambda self: self.spec.method.needs_logits)
    offload = property(lambda self: self.spec.cfg.teacher_engine.offload)
    dtype = property(lambda self: self.spec.cfg.teacher.dtype)
    full = property(lambda self: self.spec.cfg.schedule.mode == "full")
    topology = property(lambda self: self.spec.cfg.runtime.topology)

    @property
    def n(self) -> int:
        return self.B * self.T

    @property
    def micro_steps(self) -> int:
        """Micro-steps per student rank over all stages."""
        return sum(s.micro_batches for s in self.budget.stages)


def ram_per_node(prof, gpus: int) -> float:
    """Host RAM of one node of the profile (its device memory where host and device share it)."""
    return (prof.device_mem_gib if prof.unified else prof.host_mem_gib_per_device * gpus) * GiB


def make_setup(cfg: RunConfig, teacher: ModelShape, student: ModelShape, nodes: int, gpus: int, prof=None) -> Setup:
    if nodes < 1 or gpus < 1:
        raise ValueError(f"--nodes ({nodes}) and --gpus-per-node ({gpus}) must be >= 1")
    roles = Roles.build(cfg.runtime.topology, nodes * gpus, cfg.transport.teacher_ranks, gpus)
    ram = ram_per_node(prof or get_profile("h200"), gpus)
    return Setup(specmod.resolve(cfg, teacher, student, roles, cfg.data.max_sequences, ram), gpus)


def captured_layers(L_T: int, L_S: int, residual: str) -> int:
    """Distinct teacher states one emission captures (default pairing; attribution may move one pair)."""
    from semalign_ds.method.pairing import default_pairing
    from semalign_ds.method.targets import target_recipes

    recipes = target_recipes(default_pairing(L_T, L_S), residual)
    return len(set().union(*(r.teacher_layers for r in recipes.values())))


# ---- the parts ----

def device_peak(su: Setup, prof, B: int, captured: int, bpt: int) -> dict[str, float]:
    """Peak device bytes of one rank (colocated: the teacher pass and the student step share the device)."""
    n = B * su.T
    teacher = tp.teacher_memory(su.teacher, n, su.tb, su.t_world, su.offload, captured, su.need_logits,
                                n * su.spec.packets.parts()["targets"])
    if not su.spec.method.needs_teacher:  # no teacher is loaded
        teacher = {"total": 0.0, "host_shard": 0.0}
    student = tp.student_memory(su.student, B, su.T, min(su.stages), su.sb, su.s_world, su.top_k, prof, su.full)
    resident = student["weights"] + student["gradients"] + student["optimizer_state"]
    phase_student = student["activations"] + student["logits_and_loss"] + n * bpt
    out = {"teacher_pass": teacher["total"], "student_resident": resident, "student_step": phase_student,
           "overhead": prof.rank_overhead_gib * GiB, "host_shard": teacher["host_shard"]}
    out["teacher_rank"] = teacher["total"] + out["overhead"]
    out["student_rank"] = resident + phase_student + out["overhead"]
    out["colocated_rank"] = resident + max(teacher["total"], phase_student) + out["overhead"]
    return out


def host_per_node(su: Setup, prof, host_shard: float, store: float) -> float:
    """Offloaded teacher shards, the packet store (memory store) and the runtime, per node."""
    roles = su.spec.roles
    return (host_shard * roles.per_node(roles.teacher_ranks) + store * roles.per_node(roles.student_ranks)
            + prof.host_overhead_gib * GiB * su.gpus)


def rank_device(su: Setup, parts: dict) -> float:
    """Colocated ranks hold both engines; split (disaggregated) and spool (teach, then train) ranks one of them."""
    if su.topology == "colocated":
        return parts["colocated_rank"]
    return max(parts["teacher_rank"], parts["student_rank"])


def largest_fitting_batch(su: Setup, prof, captured: int, bpt: int, cap: float) -> int:
    for B in range(su.B, 0, -1):
        if rank_device(su, device_peak(su, prof, B, captured, bpt)) <= cap:
            return B
    return 0


def attribution_pass_seconds(su: Setup, prof, method: str = "grad_x_act") -> float:
    """One attribution micro-batch: forward + backward through the teacher (params streamed twice); by ablation
    L_T + 1 forwards (pairing.attribution ablation)."""
    a = tp.teacher_pass_seconds(su.teacher, su.attr_B, su.T, su.tb, prof, world=su.t_world, nodes=su.nodes,
                                offload=su.offload, dtype=su.dtype)
    if method == "ablation":
        return (su.teacher.layers + 1) * max(a["compute_s"], a["fetch_s"], a["gather_s"])
    return max(3 * a["compute_s"], 2 * a["fetch_s"], 2 * a["gather_s"])


def timings(cfg: RunConfig, su: Setup, prof) -> dict[str, float]:
    """Seconds per teacher pass and student step, attribution, the map, the one teacher pass over the data and
    the whole run for the topology."""
    t = tp.teacher_pass_seconds(su.teacher, su.B, su.T, su.tb, prof, world=su.t_world, nodes=su.nodes,
                                offload=su.offload, dtype=su.dtype)
    per_stage = {s.k: s.micro_batches * tp.student_step_seconds(su.student, su.B, su.T, s.k, prof,
                                                                 cfg.student.dtype, su.full)
                 for s in su.budget.stages}
    train = sum(per_stage.values())
    attribution, method = 0.0, su.spec.method
    if method.needs_attribution:
        per_epoch = max(1, cfg.data.max_sequences // su.t_world // su.attr_B)
        attribution = min(cfg.pairing.attribution_batches, per_epoch) * attribution_pass_seconds(
            su, prof, cfg.pairing.attribution)
    shared = min(su.teacher.vocab, su.student.vocab)
    build = tp.map_build(su.teacher, su.student, shared, prof)["seconds"] if needs_map(su) else 0.0
    teach = math.ceil(cfg.data.max_sequences / (su.t_world * su.B)) * t["pass_s"] * su.spec.teacher_passes_per_sample
    if su.topology == "disaggregated":  # the student trains its first epoch on packets as they arrive
        first = su.budget.stages[0]
        overlap = min(teach, per_stage[first.k] * min(1.0, 1.0 / max(first.epochs, 1e-9)))
        run = teach + train - overlap
    else:
        run = teach + train
    student = train / max(su.micro_steps, 1)
    return {**t, "student_s": student, "attribution_s": attribution, "map_s": build, "teach_once_s": teach,
            "train_s": train, "wall_s": attribution + build + run}


# ---- the plan ----

def build_plan(cfg: RunConfig, teacher: ModelShape, student: ModelShape, nodes: int, gpus: int, prof) -> Plan:
    su = make_setup(cfg, teacher, student, nodes, gpus, prof)
    captured = captured_layers(teacher.layers, student.layers, cfg.method.residual)
    bpt = su.spec.packets.bytes_per_token
    plan = Plan()
    _describe(plan, cfg, su, prof, bpt)
    t = timings(cfg, su, prof)
    _speed(plan, cfg, su, t, prof)
    _budget(plan, su)
    _memory(plan, cfg, su, prof, captured, bpt)
    _attribution(plan, cfg, su, prof)
    _map(plan, cfg, su, prof)
    _packets_and_wall(plan, cfg, su, prof, t)
    return plan


def _describe(plan: Plan, cfg, su: Setup, prof, bpt: int) -> None:
    plan.add("run", f"{cfg.name}: teacher {su.teacher.total_params / 1e9:.2f}B params ({cfg.teacher.dtype}, "
                    f"offload {su.offload}), student {su.student.total_params / 1e9:.3f}B ({cfg.student.dtype}), "
                    f"{cfg.runtime.topology}, {su.nodes} node(s) x {su.gpus} = {su.nodes * su.gpus} ranks")
    plan.add("device profile", f"{prof.name}: {prof.source}")
    plan.add("tokens per weight pass", f"{su.n:,} per teacher rank (data.micro_batch_size {su.B} x data.seq_len "
                                       f"{su.T})", "tokens_per_pass", su.n)
    packets = su.spec.packets
    parts = ", ".join(f"{k} {v:,}" for k, v in packets.parts().items() if v)
    plan.add("bytes per token moved", f"{bpt:,} ({parts})", "bytes_per_token", bpt)
    for k, v in packets.parts().items():
        plan.figures[f"bytes_per_token.{k}"] = v
    plan.add("codec", codec_line(su), "codec", packets.codec)


def codec_line(su: Setup) -> str:
    """The codec the run uses, what it keeps and why (against the lossless packet of the same run)."""
    from dataclasses import replace

    p, t = su.spec.packets, su.spec.cfg.transport
    lossless = replace(p, codec="lossless").bytes_per_token
    if p.codec == "lossless":
        return (f"lossless (transport.codec): the teacher's tensors as emitted; transport.codec=compact would move "
                f"{replace(p, codec='compact').bytes_per_token:,} B per token")
    rank = f"rank <= {t.target_rank} at {t.target_energy:g} of the variance" if t.target_energy else \
        f"rank {t.target_rank}"
    return (f"compact (transport.codec): per layer {rank}, {p.target_bits}-bit coefficients, {p.logit_bits}-bit "
            f"top-k logits, {p.id_bytes}-byte ids: {lossless / p.bytes_per_token:.0f}x smaller than lossless "
            f"({lossless:,} B per token); bases fitted on the first {t.fit_tokens:,} tokens, the reconstruction "
            f"error logged per layer (codec/*); the quality it keeps: docs/RESULTS.md")


def _speed(plan: Plan, cfg, su: Setup, t: dict, prof) -> None:
    bound = max(("compute", t["compute_s"]), ("host->device", t["fetch_s"]), ("all-gather", t["gather_s"]),
                key=lambda x: x[1])[0]
    plan.add("teacher pass", f"{t['pass_s']:.3f} s per rank: compute {t['compute_s']:.3f}, host->device "
                             f"{t['fetch_s']:.3f}, all-gather {t['gather_s']:.3f} -> {bound} bound",
             "teacher_pass_s", t["pass_s"])
    tps = su.t_world * su.n / t["pass_s"]
    plan.add("teacher tokens/s", f"{rate(tps)} over {su.t_world} teacher ranks", "teacher_tokens_per_s", tps)
    plan.add("student step", f"{t['student_s']:.3f} s per micro-step (mean over {len(su.stages)} stages); "
                             f"{rate(su.s_world * su.n / t['student_s'])} tokens/s", "student_step_s", t["student_s"])
    if su.nodes > 1 and t["gather_s"] >= max(t["compute_s"], t["fetch_s"]):
        one = tp.teacher_pass_seconds(su.teacher, su.B, su.T, su.tb, prof, world=su.gpus, nodes=1,
                                      offload=su.offload, dtype=su.dtype)
        plan.advice.append(f"the teacher's ZeRO-3 all-gather crosses nodes: every pass gathers the whole teacher "
                           f"over the network ({prof.network_gbps:g} GB/s per GPU against {prof.interconnect_gbps:g} "
                           f"inside a node), so a pass takes {t['pass_s']:.2f} s here against {one['pass_s']:.2f} s "
                           f"on one node (attribution too); more nodes add student ranks, not teacher speed: run "
                           f"the teacher on one node (--nodes 1), or a spool/disaggregated job with a one-node "
                           f"teacher")
    if t["fetch_s"] > t["compute_s"]:
        need = math.ceil(su.B * t["fetch_s"] / t["compute_s"])
        plan.advice.append(f"the teacher waits on host->device copies ({t['fetch_s']:.2f} s vs {t['compute_s']:.2f} s "
                           f"compute per pass): raise data.micro_batch_size to >= {need} ({need * su.T:,} tokens "
                           "per weight pass) if memory allows, or spread the teacher over more GPUs")


def _budget(plan: Plan, su: Setup) -> None:
    b, first = su.budget, su.budget.stages[0]
    plan.add("stages", f"{len(b.stages)} x {first.steps} optimizer steps ({first.epochs:.2f} epochs of "
                       f"{b.num_sequences:,} sequences over {su.s_world} student rank(s))", "steps_per_stage",
             first.steps)
    plan.add("tokens per stage", f"{first.tokens:,} token positions ({first.sequences:,} sequences)",
             "tokens_per_stage", first.tokens)


def _memory(plan: Plan, cfg, su: Setup, prof, captured: int, bpt: int) -> None:
    parts = device_peak(su, prof, su.B, captured, bpt)
    per_rank = rank_device(su, parts)
    store = su.spec.store_bytes_per_rank if su.spec.store == "memory" else 0.0
    host = host_per_node(su, prof, parts["host_shard"], store)
    cap = prof.device_mem_gib * GiB
    plan.add("device memory per rank", f"{gib(per_rank)} of {prof.device_mem_gib:.0f} GiB: teacher pass "
                                       f"{gib(parts['teacher_pass'])}, student resident "
                                       f"{gib(parts['student_resident'])}, student step {gib(parts['student_step'])}, "
                                       f"runtime {gib(parts['overhead'])}", "device_gib", per_rank / GiB)
    if prof.unified:
        used, host_cap = (per_rank + parts["host_shard"] + store + prof.host_overhead_gib * GiB) * su.gpus, cap
        plan.add("memory per node (unified)", f"{gib(used)} of {prof.device_mem_gib:.0f} GiB: packet store "
                                              f"{gib(store * su.gpus)}, runtime "
                                              f"{gib(prof.host_overhead_gib * GiB * su.gpus)}", "host_gib", used / GiB)
    else:
        used, host_cap = host, prof.host_mem_gib_per_device * su.gpus * GiB
        plan.add("host memory per node", f"{gib(host)} of {host_cap / GiB:.0f} GiB: teacher shards "
                                         f"{gib(parts['host_shard'] * min(su.gpus, su.t_world))} (pinned), packet "
                                         f"store {gib(store * min(su.gpus, su.s_world))}, runtime "
                                         f"{gib(prof.host_overhead_gib * GiB * su.gpus)}", "host_gib", host / GiB)
    if per_rank > cap:
        _device_advice(plan, su, prof, captured, bpt, per_rank, cap)
    if used > host_cap:
        _host_advice(plan, su, prof, used, host_cap, store)


def _device_advice(plan: Plan, su: Setup, prof, captured: int, bpt: int, per_rank: float, cap: float) -> None:
    plan.problems.append(f"device memory per rank {gib(per_rank)} exceeds the {prof.device_mem_gib:.0f} GiB of "
                         f"one {prof.name}")
    B = largest_fitting_batch(su, prof, captured, bpt, cap)
    if B:
        plan.advice.append(f"set data.micro_batch_size={B} (the largest that fits; raise "
                           f"schedule.grad_accum to keep the batch)")
    else:
        plan.advice.append("even data.micro_batch_size=1 does not fit: shorten data.seq_len, use "
                           "teacher_engine.offload=cpu, more GPUs (ZeRO-2 splits the optimizer state) or a smaller "
                           "student")


def _host_advice(plan: Plan, su: Setup, prof, used: float, cap: float, store: float) -> None:
    plan.problems.append(f"host memory per node {gib(used)} exceeds {gib(cap)}: the offloaded teacher"
                         f"{' and the packet store do' if store else ' does'} not fit in host RAM")
    if store:
        plan.advice.append("set transport.store=disk (each rank keeps its packets in a local spool, "
                           "transport.store_dir)")
    per_node_cap = prof.host_mem_gib_per_device * su.gpus * GiB - prof.host_overhead_gib * GiB * su.gpus
    weights = su.teacher.total_params * su.tb
    nodes = math.ceil(weights / per_node_cap) if per_node_cap > 0 else 0
    hint = f"use >= {nodes} nodes (the shards split over nodes) or " if nodes else ""
    plan.advice.append(f"{hint}set teacher_engine.offload=nvme (shards on node-local NVMe: "
                       f"{gib(weights / max(1, su.nodes))} per node)")


def _attribution(plan: Plan, cfg, su: Setup, prof) -> None:
    if not su.spec.method.needs_attribution:
        plan.add("attribution", "off (no layer targets, pairing.critical_layer false or pairing.manual set)")
        return
    def peak(B: int) -> float:
        work = tp.teacher_memory(su.teacher, B * su.T, su.tb, su.t_world, su.offload, 0, False, 0)
        return (tp.attribution_memory(su.teacher, B * su.T, su.tb) + work["total"] + su.student.total_params * su.sb
                + prof.rank_overhead_gib * GiB)
    need, cap = peak(su.attr_B), prof.device_mem_gib * GiB
    plan.add("attribution peak per rank", f"{gib(need)} (teacher forward+backward on {su.attr_B} sequences, "
                                          f"pairing.attribution_micro_batch)", "attribution_gib", need / GiB)
    if need > cap:
        fit = next((B for B in range(su.attr_B, 0, -1) if peak(B) <= cap), 0)
        plan.problems.append(f"layer attribution needs {gib(need)} per rank, more than {prof.device_mem_gib:.0f} GiB")
        how = f"set pairing.attribution_micro_batch={fit}" if fit else "shorten data.seq_len"
        plan.advice.append(f"attribution keeps every teacher layer's activations: {how}, or skip it with "
                           "pairing.critical_layer=false (or a pairing.manual table)")


def needs_map(su: Setup) -> bool:
    """The alignment map is built where layer targets travel through one (method.map other than none)."""
    return su.spec.method.needs_targets and su.spec.method.map != "none"


def _map(plan: Plan, cfg, su: Setup, prof) -> None:
    if not needs_map(su):
        return
    build = tp.map_build(su.teacher, su.student, min(su.teacher.vocab, su.student.vocab), prof)
    plan.add("semantic bases + map", f"{duration(build['seconds'])} once per run on the first rank (float64 Gram "
                                     f"matrices; cached by weight hash), peak {gib(build['peak_bytes'])}",
             "map_gib", build["peak_bytes"] / GiB)
    if build["peak_bytes"] > prof.device_mem_gib * GiB:
        plan.problems.append(f"building the semantic bases needs {gib(build['peak_bytes'])} on one device")


def _packets_and_wall(plan: Plan, cfg, su: Setup, prof, t: dict) -> None:
    spec = su.spec
    per_sample, total, per_rank = spec.packets.bytes_per_sample, spec.total_packet_bytes, spec.store_bytes_per_rank
    passes = spec.teacher_passes_per_sample
    if spec.method.needs_teacher:
        why = "one per stage: a windowed store" if passes > 1 else "every stage trains from its packets"
        plan.add("teacher passes per sample", f"{passes:g} ({why})", "teacher_passes_per_sample", passes)
    else:
        plan.add("teacher passes per sample", "0 (the method needs no teacher output: no teacher is loaded)",
                 "teacher_passes_per_sample", 0.0)
    where = {"memory": "in host memory", "disk": "in a local spool per rank (transport.store_dir)",
             "spool": "in the spool (semalign teach)", "none": "(none kept)"}[spec.store]
    bpt = spec.packets.bytes_per_token
    plan.add("packets", f"{gib(total)} ({per_sample:,} B per sample), {gib(per_rank)} per student rank {where}; "
                        f"{bpt * 1e6 / GiB:,.2f} GiB per 1M tokens, {bpt * 1e9 / 1e12:,.2f} TB per 1B tokens",
             "spool_bytes", total)
    plan.add("packet scope", scope_line(su, t), "scope", spec.scope)
    plan.figures["store_bytes_per_rank"] = per_rank
    plan.figures["store_host_bytes_per_rank"] = per_rank if spec.store == "memory" else 0.0
    plan.figures["store_kind"] = spec.store
    plan.add("wall time", f"{duration(t['wall_s'])} (attribution {duration(t['attribution_s'])}, map "
                          f"{duration(t['map_s'])}, teacher pass {duration(t['teach_once_s'])}, {su.micro_steps:,} "
                          f"student micro-steps over {len(su.stages)} stages {duration(t['train_s'])})",
             "wall_s", t["wall_s"])


SHAPES_HINT = ("`semalign plan` reads only each model's config.json: point {key} at a checkpoint folder, or at a "
               "folder holding just its config.json (bench/throughput/shapes/ has llama-3.1-70b, llama-3.1-8b and "
               "llama-3.2-1b), e.g. {key}=bench/throughput/shapes/llama-3.1-70b")


def _shape(model, key: str) -> ModelShape:
    """The model's shape from its config.json, read as JSON (no transformers import: the plan answers in
    seconds)."""
    import json
    from pathlib import Path

    path = Path(model.path) / "config.json"
    if not model.path or not path.is_file():
        what = "is empty" if not model.path else f"has no config.json ({path})"
        raise ValueError(f"{key}={model.path!r} {what}; {SHAPES_HINT.format(key=key)}")
    try:
        raw = json.loads(path.read_text())
        return ModelShape.from_config(SimpleNamespace(**raw.get("text_config", raw)))
    except (ValueError, TypeError, AttributeError):
        pass  # a family whose config.json names its sizes otherwise (GPT-2's n_embd, ...): transformers maps them
    from semalign_ds.models.loading import load_config

    try:
        return ModelShape.from_config(load_config(model.path, key, model.trust_remote_code))
    except ValueError as err:
        raise ValueError(f"{err}; {SHAPES_HINT.format(key=key)}") from None


def scope_line(su: Setup, t: dict) -> str:
    """How long packets are kept, and what the other choice would cost (the frontier schedule's trade-off: one
    stored pass for every stage, or a teacher pass per stage through one window)."""
    spec, stages = su.spec, len(su.spec.budget.stages)
    if not spec.method.needs_teacher:
        return "none (no teacher output)"
    if spec.scope == "window":
        w = spec.budget.windows
        return (f"window (transport.scope): {w.count} window(s) of <= {w.size} sequences per rank taught, trained "
                f"and dropped: {gib(spec.store_bytes_per_rank)} held per rank whatever data.max_sequences"
                + (f"; {stages} teacher passes per sample (one per stage)" if stages > 1 else ""))
    extra = (stages - 1) * t["teach_once_s"] / max(spec.teacher_passes_per_sample, 1.0)
    if stages > 1 and su.topology == "colocated":
        return (f"run (transport.scope): every stage reads the one stored pass ({gib(spec.total_packet_bytes)}); "
                f"transport.scope=window would hold one window instead and re-teach each of the {stages} stages: "
                f"+{duration(extra)} of teacher time ({stages} passes per sample)")
    return f"run (transport.scope): every packet kept for the run ({gib(spec.total_packet_bytes)})"


def main(args) -> int:
    """The `semalign plan` command (args: config, nodes, gpus_per_node, overrides, device_profile)."""
    from semalign_ds import config as cfgmod

    cfg = cfgmod.load_config(args.config, args.overrides)
    if cfg.teacher.gguf_file or cfg.student.gguf_file:  # a GGUF checkpoint: its converted folder's config.json
        from semalign_ds.models.gguf import resolved_config

        cfg = resolved_config(cfg)
    teacher, student = (_shape(m, key) for m, key in ((cfg.teacher, "teacher.path"), (cfg.student, "student.path")))
    name = getattr(args, "device_profile", None) or ("cpu" if cfg.runtime.device == "cpu" else "h200")
    plan = build_plan(cfg, teacher, student, args.nodes, args.gpus_per_node, get_profile(name))
    if getattr(args, "json", False):
        import json

        print(json.dumps({"fits": plan.fits, "figures": plan.figures, "problems": plan.problems,
                          "advice": plan.advice}, indent=1))
    else:
        print(plan.render())
    return 0 if plan.fits else 1
