"""The SemAlign run: attribution -> pairing -> map -> stages -> checkpoint -> export -> evaluation.

runtime.topology picks what feeds the student loop (topology.py): colocated (every rank holds a ZeRO-3 shard of
the teacher and a ZeRO-2 student; packets pass in memory), disaggregated (teacher ranks stream packets to student
ranks of the same job) or spool (`teach` writes packets to disk once; `run` with topology spool trains from them;
no teacher engine on the student side, so evaluation leaves out the teacher's columns). A killed run
restarts from the output directory's last checkpoint (stage boundary, or every `runtime.checkpoint_every` steps
inside a stage) and ends with the same weights as an uninterrupted run: data order is a pure function of
(seed, stage, step), the teacher is deterministic, and the student trains with dropout off.
Legend: ids_BT, mask_BT, M_DsDt (alignment map, student x teacher hidden).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semalign_ds import config as cfgmod
from semalign_ds import data as datamod
from semalign_ds import distributed, files, ownership, report, signals, throughput
from semalign_ds.config import RunConfig
from semalign_ds.method.pairing import PairingTable, build_pairing
from semalign_ds.method.targets import target_recipes
from semalign_ds.models.adapters import get_adapter
from semalign_ds.models.loading import load_causal_lm, load_config, load_tokenizer, torch_dtype
from semalign_ds.progress import bar, phase
from semalign_ds.tracking import make_tracker
from semalign_ds import evaluate, resume, supervision, topology
from semalign_ds.transport import spool


@dataclass
class Run:
    """Everything the phases share; built once by `prepare`."""

    cfg: RunConfig
    info: distributed.DistInfo
    out: Path
    tracker: object
    tok_T: object
    tok_S: object
    student: torch.nn.Module
    teacher: object
    blocks: datamod.TokenBlocks
    vocab: supervision.VocabMap
    progress: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    role: str = "colocated"  # colocated | writer (teach) | teacher / student (disaggregated; student: spool too)
    group: object = None  # this role's process group (None: the world)
    mpu: object = None  # engines.teacher.GroupMPU over `group` (None: the world)

    @property
    def writes(self) -> bool:
        """The rank that writes the run's files and logs to MLflow (teacher ranks of a split job never do)."""
        return self.info.is_main and self.role != "teacher"


def run(cfg: RunConfig) -> dict:
    """Run a whole transfer; returns the evaluation summary (also written to <output_dir>/eval.json)."""
    info = _init(cfg)
    if cfg.runtime.topology == "disaggregated":
        return _run_disaggregated(cfg, info)
    if cfg.runtime.topology == "spool":
        return _run_from_spool(cfg, info)
    r = prepare(cfg, info)
    return _guarded(r, lambda: _run_colocated(r))


def _init(cfg: RunConfig) -> distributed.DistInfo:
    device = distributed.resolve_device(cfg.runtime.device)
    cfg.runtime.device = device
    return distributed.init(device, cfg.runtime.dist_timeout_s)


def _guarded(r: Run, body):
    """Every exit ends the MLflow run: FINISHED, KILLED (a signal or Ctrl-C) or FAILED with the error as a tag."""
    try:
        result = body()
        r.tracker.finish("FINISHED")
        return result
    except BaseException as err:
        killed = isinstance(err, (KeyboardInterrupt, signals.Preempted))
        r.tracker.set_tags({"stopped_by" if killed else "error": f"{type(err).__name__}: {err}"[:5000]})
        r.tracker.finish("KILLED" if killed else "FAILED")
        raise


def _run_colocated(r: Run) -> dict:
    table = pair_layers(r)
    M_DsDt = supervision.build_map(r, table)
    train_stages(r, topology.ColocatedFeed(r, _recipes(r, table), M_DsDt))
    return _finish(r)


def _finish(r: Run) -> dict:
    export_dir = export_student(r)
    return evaluate.evaluate_run(r, export_dir)


def _run_from_spool(cfg: RunConfig, info) -> dict:
    """Topology spool: train from `transport.spool_dir` (`semalign train --from-spool DIR`); no teacher engine."""
    if not cfg.transport.spool_dir:
        raise ValueError("runtime.topology=spool needs transport.spool_dir (`semalign train --from-spool DIR`); "
                         "write one with `semalign teach --config X --out DIR`")
    r = prepare(cfg, info, role="student")

    def body():
        from semalign_ds.transport.spool import SpoolReader

        feed = topology.SpoolFeed(r, SpoolReader(cfg.transport.spool_dir, supervision.binding(r)))
        record_pairing(r, feed.table)
        train_stages(r, feed)
        return _finish(r)
    return _guarded(r, body)


def _run_disaggregated(cfg: RunConfig, world: distributed.DistInfo) -> dict:
    """Topology disaggregated: the first transport.teacher_ranks ranks stream packets to the others."""
    from semalign_ds.engines.teacher import GroupMPU

    layout = distributed.RankLayout.build("disaggregated", world.world_size, cfg.transport.teacher_ranks)
    group, single = topology.role_groups(layout, world.rank)
    teacher = layout.is_teacher(world.rank)
    info = topology.role_info(world, layout.teacher_ranks if teacher else layout.student_ranks)
    if teacher:
        with topology.tell_students_on_error(cfg, layout, info.device):
            r = prepare(cfg, info, role="teacher", group=group, mpu=GroupMPU(group, single))
            return _guarded(r, lambda: _serve_stream(r, layout))
    r = prepare(cfg, info, role="student", group=group, mpu=GroupMPU(group, single))
    # transformers' save_pretrained writes only on global rank 0 (a teacher rank here): the student's first rank
    # writes its checkpoints and export instead (the callers already restrict writing to it)
    r.student.should_save_on_this_rank = lambda is_main_process: is_main_process
    return _guarded(r, lambda: _train_from_stream(r, layout))


def _serve_stream(r: Run, layout) -> dict:
    table = pair_layers(r)
    M_DsDt = supervision.build_map(r, table)
    schedule = stage_schedule(r, len(layout.student_ranks))
    stats = topology.serve_stream(r, layout, _recipes(r, table), M_DsDt, supervision.binding(r, table, M_DsDt),
                                  table, schedule)
    return {"table": f"teacher rank {r.info.rank}: streamed {stats['packets']} packets, "
                     f"{stats['bytes'] / 2**20:.1f} MiB, idle {stats['idle_s']:.1f} of {stats['wall_s']:.1f} s"}


def _train_from_stream(r: Run, layout) -> dict:
    feed = topology.StreamFeed(r, layout)
    record_pairing(r, feed.hello())
    train_stages(r, feed)
    stats = feed.finish()
    if r.writes:
        r.tracker.log_metrics(stats)
    return _finish(r)


def teach(cfg: RunConfig) -> dict:
    """`semalign teach`: one teacher pass over the transfer data spools every stage's packets to
    transport.spool_dir (resumes an interrupted spool); returns the manifest."""
    if not cfg.transport.spool_dir:
        raise ValueError("`semalign teach` needs an output directory: --out DIR (transport.spool_dir)")
    info = _init(cfg)
    out = Path(cfg.transport.spool_dir)
    state = out / "teach.json"
    progress = json.loads(state.read_text()) if state.is_file() else {}
    if progress.get("config_hash") != cfgmod.result_hash(cfg):
        progress = {}
    r = prepare(cfg, info, role="writer", out=out, progress=progress)

    def body():
        table = pair_layers(r)
        if r.writes:
            state.write_text(json.dumps({"config_hash": cfgmod.result_hash(cfg), "pairing": True,
                                         "mlflow_run_id": r.progress.get("mlflow_run_id")}))
        M_DsDt = supervision.build_map(r, table)
        recipes = _recipes(r, table)
        stages = stage_list(cfg, get_adapter(r.student).num_layers)
        layers = sorted({l for _, ls, _ in supervision.stage_plan(cfg, stages, 1) for l in ls})
        need = spool.space_needed(out, len(r.blocks), r.blocks.seq_len, len(layers),
                                  get_adapter(r.student).hidden_size, cfg.method.top_k, cfg.method.target_dtype)
        files.check_free_space(out, need, f"the spool ({len(r.blocks)} sequences x {r.blocks.seq_len} tokens)")
        manifest = topology.write_spool(r, {l: recipes[l] for l in layers}, M_DsDt,
                                        supervision.binding(r, table, M_DsDt), layers)
        if r.writes:
            r.tracker.log_metrics({"teacher_passes_per_sample": manifest["teacher_passes_per_sample"],
                                   "transport/spool_bytes_per_token": manifest["bytes_per_token"],
                                   "transport/spool_bytes": float(manifest["bytes"]),
                                   "transport/spool_write_s": r.progress["spool_write_s"]})
        return manifest
    return _guarded(r, body)


def prepare(cfg: RunConfig, info: distributed.DistInfo, role: str = "colocated", out: Path | None = None,
            progress: dict | None = None, group=None, mpu=None) -> Run:
    out = cfgmod.resolved_output_dir(cfg) if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = resume.read_progress(out, cfg) if cfg.runtime.resume else {}
    main = info.is_main and role != "teacher"
    (out / "config.yaml").write_text(cfgmod.to_yaml(cfg)) if main else None
    torch.manual_seed(cfg.seed)
    tok_T = load_tokenizer(cfg.teacher.path, "teacher.path", cfg.teacher.trust_remote_code)
    tok_S = load_tokenizer(cfg.student.path, "student.path", cfg.student.trust_remote_code)
    student = _load_student(cfg, info, out, progress)
    teacher_config = load_config(cfg.teacher.path, "teacher.path", cfg.teacher.trust_remote_code)
    blocks = _load_blocks(cfg, tok_S, [student.config, teacher_config])
    vocab = supervision.vocab_map(cfg, tok_T, tok_S, student, blocks, int(teacher_config.get_text_config().vocab_size))
    _check_layers(cfg, teacher_config, student)
    hidden_T = int(teacher_config.get_text_config().hidden_size)
    teacher = None if role == "student" else _build_teacher(cfg, info, hidden_T, mpu)
    # the MLflow run exists only once everything loaded (a load error leaves none RUNNING); the directory's
    # marker names it, so a rerun continues it (runtime.resume=false starts over: a new one)
    run_id = progress.get("mlflow_run_id") or ownership.mlflow_run_id(out) if cfg.runtime.resume else None
    tracker = make_tracker(cfg.tracking.enabled, main, cfg.tracking.uri, cfg.tracking.experiment,
                           cfg.name, out, run_id=run_id)
    progress["mlflow_run_id"] = tracker.run_id
    tracker.log_params(cfgmod.flatten(cfg))
    tracker.set_tags({"config_hash": cfgmod.result_hash(cfg), "world_size": info.world_size,
                      "topology": cfg.runtime.topology, "role": role})
    if main:
        ownership.note_mlflow_run(out, tracker.run_id)
        tracker.log_artifact(out / "config.yaml")
    return Run(cfg, info, out, tracker, tok_T, tok_S, student, teacher, blocks, vocab, progress, role=role,
               group=group, mpu=mpu)


def _check_layers(cfg: RunConfig, teacher_config, student) -> None:
    """Layer indices in the config against both models, before the teacher is loaded."""
    L_S = get_adapter(student).num_layers
    stage_list(cfg, L_S)
    L_T = int(teacher_config.get_text_config().num_hidden_layers)
    manual = cfg.pairing.manual
    if manual is not None and (len(manual) != L_S or not all(1 <= l <= L_T for l in manual)):
        raise ValueError(f"pairing.manual={manual} must list {L_S} teacher layers (one per student layer), "
                         f"each in 1..{L_T}")


def _load_student(cfg: RunConfig, info, out: Path, progress: dict) -> torch.nn.Module:
    path = progress.get("model_dir") or cfg.student.path  # resume: the checkpoint's weights
    student = load_causal_lm(path, torch_dtype(cfg.student.dtype), info.device,
                             cfg.student.trust_remote_code, key="student.path")
    student.eval()  # dropout off: targets are matched deterministically and resume is exact
    for p in student.parameters():
        p.requires_grad_(False)
    return student


def _load_blocks(cfg: RunConfig, tok_S, model_configs) -> datamod.TokenBlocks:
    datamod.check_seq_len(cfg.data.seq_len, *model_configs)
    texts = datamod.load_texts(cfg.data, "data")
    return datamod.pack_sequences(texts, tok_S, cfg.data.seq_len, cfg.data.max_sequences)


def _build_teacher(cfg: RunConfig, info, hidden_size: int, mpu=None):
    from semalign_ds.engines.ds_config import load_template, teacher_ds_config
    from semalign_ds.engines.teacher import TeacherEngine

    template = load_template(resume.find_template(cfg.teacher_engine.ds_config, "teacher_engine.ds_config"))
    ds = teacher_ds_config(template, offload=cfg.teacher_engine.offload, nvme_path=cfg.teacher_engine.nvme_path,
                           bf16=cfg.teacher.dtype == "bfloat16", micro_batch=cfg.data.micro_batch_size,
                           world_size=info.world_size, device=info.device, hidden_size=hidden_size)
    with phase("teacher load", enabled=info.is_main and cfg.runtime.progress):
        return TeacherEngine.from_pretrained(cfg.teacher.path, ds_config=ds, dtype=torch_dtype(cfg.teacher.dtype),
                                             device=info.device, trust_remote_code=cfg.teacher.trust_remote_code,
                                             mpu=mpu)


def pair_layers(r: Run) -> PairingTable:
    """Attribution on the teacher over the transfer data, then the pairing table (saved; reused on resume)."""
    path = r.out / "pairing.json"
    if r.progress.get("pairing") and path.is_file():
        return PairingTable.from_json(path.read_text())
    cfg = r.cfg
    L_T, L_S = r.teacher.adapter.num_layers, get_adapter(r.student).num_layers
    scores_abs = scores_signed = None
    if cfg.pairing.manual is None and cfg.pairing.critical_layer:
        n = min(cfg.pairing.attribution_batches, max(1, len(r.blocks) // r.cfg.data.micro_batch_size))
        batches = [supervision.rank_batch(r, cfg.seed + 7919, i) for i in range(n)]
        teacher_batches = [(r.vocab.to_teacher(b.ids_BT), b.mask_BT) for b in batches]
        scores_abs, scores_signed = r.teacher.attribute(bar(teacher_batches, "attribution", r), range(1, L_T + 1))
        scores_abs, scores_signed = scores_abs.tolist(), scores_signed.tolist()  # all-reduced over ranks
    table = build_pairing(L_T, L_S, scores_abs, cfg.pairing.critical_layer, cfg.pairing.interpolate,
                          cfg.pairing.manual, scores_signed)
    record_pairing(r, table)
    return table


def record_pairing(r: Run, table: PairingTable) -> None:
    """Save the pairing table (and its chart) with the run; a student of a split run gets it from the teacher."""
    path = r.out / "pairing.json"
    if r.writes:
        path.write_text(table.to_json())
        r.tracker.log_artifact(path)
        if table.scores_abs:
            r.tracker.log_artifact(report.attribution_chart(table.scores_abs, _sources(table),
                                                            r.out / "attribution.png"))
    r.progress["pairing"] = True


def _recipes(r: Run, table: PairingTable) -> dict:
    return target_recipes(_sources(table), r.cfg.method.residual, supervision.target_kind(r.cfg))


def _sources(table: PairingTable) -> list:
    return [row.interp if row.interp else row.source_layer for row in table.rows]


def stage_list(cfg: RunConfig, L_S: int) -> list[int]:
    stages = cfg.schedule.stages or list(range(1, L_S + 1))
    bad = [k for k in stages if not 1 <= k <= L_S]
    if bad:
        raise ValueError(f"schedule.stages {bad} out of range: the student has layers 1..{L_S}")
    if stages != sorted(set(stages)):
        raise ValueError(f"schedule.stages {stages} must be increasing (shallow to deep) without repeats")
    return stages


def steps_for_stage(cfg: RunConfig, world_size: int) -> int:
    if cfg.schedule.tokens_per_stage is None:
        return cfg.schedule.steps_per_stage
    per_step = cfg.data.micro_batch_size * cfg.schedule.grad_accum * world_size * cfg.data.seq_len
    return max(1, math.ceil(cfg.schedule.tokens_per_stage / per_step))


def stage_schedule(r: Run, world: int) -> list[tuple[int, list[int], int, int]]:
    """(stage id, trainable layers, resume step, optimizer steps) of the stages still to train, `world` student
    ranks (a pure function of the config and the checkpoint: the teacher ranks of a split run compute it too)."""
    cfg = r.cfg
    stages = stage_list(cfg, get_adapter(r.student).num_layers)
    done = set(r.progress.get("stages_done", []))
    plan = supervision.stage_plan(cfg, stages, steps_for_stage(cfg, world))  # schedule.mode full: one stage
    return [(k, layers, resume.resume_step(r.progress, k), steps) for k, layers, steps in plan if k not in done]


def train_stages(r: Run, feed) -> None:
    """Every stage still to train, its packets from `feed` (topology.py); checkpoints inside and between."""
    from semalign_ds.engines.student import StudentStage

    done = set(r.progress.get("stages_done", []))
    for k, layers, _, steps in stage_schedule(r, r.info.world_size):
        steps = feed.capped_steps(steps)
        stage = StudentStage(r.student, k, **supervision.stage_kwargs(r, steps, layers))
        start = resume.resume_stage(r, stage, k)
        _run_stage(r, stage, k, start, steps, feed.source(k, layers, start, steps))
        stage.finish()
        r.progress["stages_done"] = sorted(done | {k})
        done.add(k)
        r.progress.pop("stage", None), r.progress.pop("step", None)
        resume.save_boundary(r)
        if r.info.is_main:
            summary = {f"stage{k}/final_{m}": v for m, v in r.history[k][-1].items() if m != "step"}
            r.tracker.log_metrics({**summary, **feed.stats()}, step=len(done))
    if r.info.is_main and r.history:
        r.tracker.log_artifact(report.loss_curves(r.history, r.out / "loss_curves.png"))


def _run_stage(r: Run, stage, k: int, start: int, total: int, source) -> None:
    cfg = r.cfg
    history = r.history.setdefault(k, [])
    packets = iter(source)
    meter = throughput.RunMeter.for_run(r)  # teacher/student tokens/s, tokens per pass, H2D GB/s, bytes/token
    logged = r.tracker.last_step(f"stage{k}/lr") if r.info.is_main else 0  # replayed after a kill: not again
    steps = bar(range(start, total), f"stage {k} (student layer {k})", r, initial=start, total=total)
    on_signal = lambda done: resume.save_inside(r, stage, done)  # noqa: E731  SIGTERM/USR1: checkpoint, exit 75
    for step in signals.graceful_steps(steps, on_signal, r.group, r.info.device):
        t0 = time.perf_counter()
        metrics = {}
        for micro in range(cfg.schedule.grad_accum):
            packet = meter.source(next, packets, None)
            if packet is None:
                raise RuntimeError(f"the packet source of stage {k} ended before step {step + 1} of {total}")
            metrics = meter.student(stage.step, packet)
        seconds = time.perf_counter() - t0
        tokens = metrics["tokens"] * cfg.schedule.grad_accum * r.info.world_size
        metrics.update(step=step + 1, tokens_per_s=tokens / seconds, **meter.flush())
        history.append(metrics)
        if r.info.is_main and step + 1 > logged:
            r.tracker.log_metrics({f"stage{k}/{m}": v for m, v in metrics.items() if m != "step"},
                                  step=step + 1)
        if (step + 1) % cfg.runtime.checkpoint_every == 0 and step + 1 < total:
            resume.save_inside(r, stage, step + 1)


def export_student(r: Run) -> Path:
    """The result: a plain Hugging Face checkpoint of the student (safetensors + tokenizer)."""
    export = r.out / "student"
    if r.info.is_main:
        tmp = r.out / "student.tmp"
        r.student.save_pretrained(tmp, safe_serialization=True)
        r.tok_S.save_pretrained(tmp)
        resume.replace_dir(tmp, export)
        r.tracker.log_metrics({"teacher_passes_per_sample": r.progress.get("teacher_passes", 0)})
    distributed.barrier(r.group)
    return export
