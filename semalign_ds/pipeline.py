"""The colocated SemAlign run: attribution -> pairing -> map -> stages -> checkpoint -> export -> evaluation.

Every rank holds a ZeRO-3 shard of the teacher and a ZeRO-2 student; packets pass in memory. A killed run
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
from semalign_ds import distributed, report
from semalign_ds.config import RunConfig
from semalign_ds.method.pairing import PairingTable, build_pairing
from semalign_ds.method.targets import target_recipes
from semalign_ds.models.adapters import get_adapter


def get_adapter_config_vocab(config) -> int:
    return int(config.get_text_config().vocab_size)
from semalign_ds.models.loading import load_causal_lm, load_config, load_tokenizer
from semalign_ds.progress import bar
from semalign_ds.tracking import make_tracker
from semalign_ds import evaluate, resume, supervision

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def run(cfg: RunConfig) -> dict:
    """Run a whole transfer; returns the evaluation summary (also written to <output_dir>/eval.json)."""
    device = distributed.resolve_device(cfg.runtime.device)
    cfg.runtime.device = device
    info = distributed.init(device, cfg.runtime.dist_timeout_s)
    r = prepare(cfg, info)
    try:
        table = pair_layers(r)
        M_DsDt = supervision.build_map(r, table)
        train_stages(r, table, M_DsDt)
        export_dir = export_student(r)
        summary = evaluate.evaluate_run(r, export_dir)
        r.tracker.finish("FINISHED")
        return summary
    except BaseException:
        r.tracker.finish("FAILED")
        raise


def prepare(cfg: RunConfig, info: distributed.DistInfo) -> Run:
    out = cfgmod.resolved_output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    progress = resume.read_progress(out, cfg) if cfg.runtime.resume else {}
    (out / "config.yaml").write_text(cfgmod.to_yaml(cfg)) if info.is_main else None
    torch.manual_seed(cfg.seed)
    tracker = make_tracker(cfg.tracking.enabled, info.is_main, cfg.tracking.uri, cfg.tracking.experiment,
                           cfg.name, out, run_id=progress.get("mlflow_run_id"))
    progress["mlflow_run_id"] = tracker.run_id
    tracker.log_params(cfgmod.flatten(cfg))
    tracker.set_tags({"config_hash": cfgmod.result_hash(cfg), "world_size": info.world_size,
                      "topology": cfg.runtime.topology})
    if info.is_main:
        tracker.log_artifact(out / "config.yaml")
    tok_T = load_tokenizer(cfg.teacher.path, "teacher.path", cfg.teacher.trust_remote_code)
    tok_S = load_tokenizer(cfg.student.path, "student.path", cfg.student.trust_remote_code)
    student = _load_student(cfg, info, out, progress)
    teacher_config = load_config(cfg.teacher.path, "teacher.path", cfg.teacher.trust_remote_code)
    blocks = _load_blocks(cfg, tok_S, [student.config, teacher_config])
    vocab = supervision.vocab_map(cfg, tok_T, tok_S, student, blocks, get_adapter_config_vocab(teacher_config))
    _check_layers(cfg, teacher_config, student)
    teacher = _build_teacher(cfg, info, int(teacher_config.get_text_config().hidden_size))
    return Run(cfg, info, out, tracker, tok_T, tok_S, student, teacher, blocks, vocab, progress)


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
    student = load_causal_lm(path, DTYPES[cfg.student.dtype], info.device,
                             cfg.student.trust_remote_code, key="student.path")
    student.eval()  # dropout off: targets are matched deterministically and resume is exact
    for p in student.parameters():
        p.requires_grad_(False)
    return student


def _load_blocks(cfg: RunConfig, tok_S, model_configs) -> datamod.TokenBlocks:
    datamod.check_seq_len(cfg.data.seq_len, *model_configs)
    texts = datamod.load_texts(cfg.data, "data.path")
    return datamod.pack_sequences(texts, tok_S, cfg.data.seq_len, cfg.data.max_sequences)


def _build_teacher(cfg: RunConfig, info, hidden_size: int):
    from semalign_ds.engines.ds_config import load_template, teacher_ds_config
    from semalign_ds.engines.teacher import TeacherEngine

    template = load_template(resume.find_template(cfg.teacher_engine.ds_config, "teacher_engine.ds_config"))
    ds = teacher_ds_config(template, offload=cfg.teacher_engine.offload, nvme_path=cfg.teacher_engine.nvme_path,
                           bf16=cfg.teacher.dtype == "bfloat16", micro_batch=cfg.data.micro_batch_size,
                           world_size=info.world_size, device=info.device, hidden_size=hidden_size)
    return TeacherEngine.from_pretrained(cfg.teacher.path, ds_config=ds, dtype=DTYPES[cfg.teacher.dtype],
                                         device=info.device, trust_remote_code=cfg.teacher.trust_remote_code)


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
    if r.info.is_main:
        path.write_text(table.to_json())
        r.tracker.log_artifact(path)
        if table.scores_abs:
            r.tracker.log_artifact(report.attribution_chart(table.scores_abs, _sources(table),
                                                            r.out / "attribution.png"))
    r.progress["pairing"] = True
    return table


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


def train_stages(r: Run, table: PairingTable, M_DsDt: torch.Tensor) -> None:
    from semalign_ds.engines.student import StudentStage

    cfg = r.cfg
    stages = stage_list(cfg, get_adapter(r.student).num_layers)
    recipes = target_recipes(_sources(table), cfg.method.residual, supervision.target_kind(cfg))
    total = steps_for_stage(cfg, r.info.world_size)
    done = set(r.progress.get("stages_done", []))
    for k in stages:
        if k in done:
            continue
        stage = StudentStage(r.student, k, **supervision.stage_kwargs(r, total))
        start = resume.resume_stage(r, stage, k)
        _run_stage(r, stage, k, start, total, {k: recipes[k]}, M_DsDt)
        stage.finish()
        r.progress["stages_done"] = sorted(done | {k})
        done.add(k)
        r.progress.pop("stage", None), r.progress.pop("step", None)
        resume.save_boundary(r)
        if r.info.is_main:
            summary = {f"stage{k}/final_{m}": v for m, v in r.history[k][-1].items() if m != "step"}
            r.tracker.log_metrics(summary, step=len(done))
    if r.info.is_main and r.history:
        r.tracker.log_artifact(report.loss_curves(r.history, r.out / "loss_curves.png"))


def _run_stage(r: Run, stage, k: int, start: int, total: int, recipes: dict, M_DsDt: torch.Tensor) -> None:
    cfg = r.cfg
    history = r.history.setdefault(k, [])
    for step in bar(range(start, total), f"stage {k} (student layer {k})", r, initial=start, total=total):
        t0 = time.perf_counter()
        metrics = {}
        for micro in range(cfg.schedule.grad_accum):
            batch = supervision.rank_batch(r, cfg.seed + k, step * cfg.schedule.grad_accum + micro)
            packet = supervision.emit(r, batch, recipes, M_DsDt)
            metrics = stage.step(packet)
        seconds = time.perf_counter() - t0
        tokens = metrics["tokens"] * cfg.schedule.grad_accum * r.info.world_size
        metrics.update(step=step + 1, tokens_per_s=tokens / seconds)
        history.append(metrics)
        if r.info.is_main:
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
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return export
