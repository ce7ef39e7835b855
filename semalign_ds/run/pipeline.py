"""The SemAlign run: attribution -> pairing -> map -> one teacher pass -> stages -> checkpoint -> export -> evaluation.

Every topology runs the teacher once per transfer sample (topology.py): colocated ranks teach their own samples
into a packet store (memory or a local spool) and train every stage from it; disaggregated teacher ranks stream
each sample once to the student rank that keeps it; `teach` writes a spool that `train --from-spool` reads. The
stage budget is in epochs or tokens (budget.py), printed and logged at the start with the rest of the plan.
A killed run restarts from the output directory's last checkpoint (stage boundary, or every
`runtime.checkpoint_every` steps inside a stage) and ends with the same weights as an uninterrupted run: the data
order is a pure function of (seed, stage, rank, micro-batch), the teacher is deterministic, the student trains
with dropout off. A disk store keeps its committed shards, so a restart teaches only what is missing.
Legend: ids_BT, mask_BT, M_DsDt (alignment map, student x teacher hidden).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from semalign_ds.run import (
    budget as budgetmod, caveats, mapping, ownership, resume, signals, space, supervision, topology)
from semalign_ds import config as cfgmod
from semalign_ds import spec as specmod
from semalign_ds import data as datamod
from semalign_ds import files
from semalign_ds.cluster import distributed
from semalign_ds.evaluation import evaluate, report
from semalign_ds.planning import throughput
from semalign_ds.config import RunConfig
from semalign_ds.run.context import RunContext
from semalign_ds.method.pairing import PairingTable, build_pairing
from semalign_ds.method.targets import target_recipes
from semalign_ds.models.adapters import get_adapter
from semalign_ds.models.loading import load_causal_lm, load_config, load_tokenizer, torch_dtype
from semalign_ds.progress import bar, phase
from semalign_ds.run.resume import Progress
from semalign_ds import tracking
from semalign_ds.tracking import make_tracker
from semalign_ds.transport import schema, spool
from semalign_ds.transport.codec import Codec

ATTRIBUTION_SEED = 7919  # the batches attribution reads: a property of the data, not of the training seed


def run(cfg: RunConfig) -> dict:
    """Run a whole transfer; returns the evaluation summary (also written to <output_dir>/eval.json)."""
    cfg = resolved_models(cfg)
    info = _init(cfg)
    if cfg.runtime.topology == "disaggregated":
        return _run_disaggregated(cfg, info)
    if cfg.runtime.topology == "spool":
        if not cfg.transport.spool_dir:
            raise ValueError("runtime.topology=spool needs transport.spool_dir (`semalign train --from-spool DIR`); "
                             "write one with `semalign teach --config X --out DIR`")
        ctx, progress = prepare(cfg, info, role="student")
        return _guarded(ctx, lambda: _run_from_spool(ctx, progress))
    ctx, progress = prepare(cfg, info)
    return _guarded(ctx, lambda: _run_colocated(ctx, progress))


def resolved_models(cfg: RunConfig) -> RunConfig:
    """The config with GGUF checkpoints (teacher/student.gguf_file) replaced by their cached safetensors folders."""
    from semalign_ds.models.gguf import resolved_config

    return resolved_config(cfg)


def _init(cfg: RunConfig) -> distributed.DistInfo:
    device = distributed.resolve_device(cfg.runtime.device)
    cfg.runtime.device = device
    return distributed.init(device, cfg.runtime.dist_timeout_s)


def _guarded(ctx: RunContext, body):
    """Every exit ends the MLflow run: FINISHED, KILLED (a signal or Ctrl-C) or FAILED with the error as a tag."""
    try:
        result = body()
        ctx.tracker.finish("FINISHED")
        return result
    except BaseException as err:
        killed = isinstance(err, (KeyboardInterrupt, signals.Preempted))
        ctx.tracker.set_tags({"stopped_by" if killed else "error": f"{type(err).__name__}: {err}"[:5000]})
        ctx.tracker.finish("KILLED" if killed else "FAILED")
        raise


def _say(ctx: RunContext, line: str) -> None:
    if ctx.writes:
        print(line, flush=True)


# ---------------------------------------------------------------- the three topologies


def _run_colocated(ctx: RunContext, progress: Progress) -> dict:
    announce(ctx)
    if not ctx.spec.method.needs_teacher:  # e.g. SFT: the labels are the whole supervision
        feed = topology.Feed(ctx, topology.LabelStore(ctx.blocks), "data", Codec())
        return _finish(ctx, progress, train_stages(ctx, progress, feed))
    table = pair_layers(ctx, progress)
    M_DsDt = mapping.build_map(ctx, table)
    recipes = _recipes(ctx, table, ctx.spec.trained_layers)
    codec = make_codec(ctx, recipes, M_DsDt)
    binding = supervision.binding(ctx, table, M_DsDt, codec)
    _check_space(ctx)
    if ctx.spec.windowed:  # teach a window, train on it, drop it: the store stays one window
        feed = topology.WindowFeed(ctx, progress, recipes, M_DsDt, codec, binding)
        history = train_stages(ctx, progress, feed)
        return _finish(ctx, progress, history)
    store = topology.open_store(ctx, binding, ctx.spec.store, codec)
    resume.check_packets(ctx, progress, schema.digest(binding))
    t0 = time.perf_counter()
    counts = topology.teach_local(ctx, store, recipes, M_DsDt, codec)
    seconds = time.perf_counter() - t0
    samples, restored, tokens = distributed.all_reduce([counts["samples"], counts["restored"], counts["tokens"]],
                                                       ctx.info.device, ctx.group)
    # samples restored from a disk store were emitted by an earlier attempt: counted once, whether or not a
    # checkpoint recorded them (a memory store's attempt killed before its first checkpoint goes uncounted)
    progress.teacher_samples = max(progress.teacher_samples, int(restored)) + int(samples)
    counts.update(samples=samples, restored=restored)
    _log_teach(ctx, progress, store, {**counts, "tokens": tokens, "seconds": seconds})
    history = train_stages(ctx, progress, topology.Feed(ctx, store, store.kind, codec))
    _drop_store(ctx, store)
    return _finish(ctx, progress, history)


def _run_from_spool(ctx: RunContext, progress: Progress) -> dict:
    """Topology spool: train from `transport.spool_dir` (`semalign train --from-spool DIR`); no teacher engine."""
    from semalign_ds.transport.spool import SpoolReader

    reader = SpoolReader(ctx.cfg.transport.spool_dir, supervision.binding(ctx))
    record_pairing(ctx, progress, topology.spool_pairing(ctx, reader))
    resume.check_packets(ctx, progress, reader.manifest["binding_digest"])
    progress.teacher_samples = round(reader.manifest.get("teacher_passes_per_sample", 1.0) * reader.num_samples)
    announce(ctx, spool_bytes=reader.manifest["bytes"])
    _check_space(ctx)
    history = train_stages(ctx, progress, topology.Feed(ctx, reader, "spool_read", reader.codec, check_tokens=True))
    return _finish(ctx, progress, history)


def _run_disaggregated(cfg: RunConfig, world: distributed.DistInfo) -> dict:
    """Topology disaggregated: the first transport.teacher_ranks ranks stream packets to the others."""
    from semalign_ds.engines.teacher import GroupMPU

    layout = specmod.Roles.build("disaggregated", world.world_size, cfg.transport.teacher_ranks,
                                 world.local_world_size)
    group, single = topology.role_groups(layout, world.rank)
    teacher = layout.is_teacher(world.rank)
    info = topology.role_info(world, layout.teacher_ranks if teacher else layout.student_ranks)
    if teacher:
        with topology.tell_students_on_error(cfg, layout, info.device):
            ctx, progress = prepare(cfg, info, role="teacher", group=group, mpu=GroupMPU(group, single),
                                    roles=layout)
            return _guarded(ctx, lambda: _serve_stream(ctx, progress, layout))
    ctx, progress = prepare(cfg, info, role="student", group=group, mpu=GroupMPU(group, single), roles=layout)
    # transformers' save_pretrained writes only on global rank 0 (a teacher rank here): the student's first rank
    # writes its checkpoints and export instead (the callers already restrict writing to it)
    ctx.student.should_save_on_this_rank = lambda is_main_process: is_main_process
    return _guarded(ctx, lambda: _train_from_stream(ctx, progress, layout))


def _serve_stream(ctx: RunContext, progress: Progress, layout) -> dict:
    table = pair_layers(ctx, progress)
    M_DsDt = mapping.build_map(ctx, table)
    recipes = _recipes(ctx, table, ctx.spec.trained_layers)
    codec = make_codec(ctx, recipes, M_DsDt)
    stats = topology.serve_stream(ctx, layout, recipes, M_DsDt, supervision.binding(ctx, table, M_DsDt, codec),
                                  table, ctx.spec.budget.stages[0].k, codec)
    return {"table": f"teacher rank {ctx.info.rank}: streamed {stats['packets']} packets ({stats['samples']} "
                     f"samples), {stats['bytes'] / 2**20:.1f} MiB, idle {stats['idle_s']:.1f} of "
                     f"{stats['wall_s']:.1f} s"}


def _train_from_stream(ctx: RunContext, progress: Progress, layout) -> dict:
    feed_store = topology.StreamStore(ctx, layout, None, ctx.spec.budget.stages[0].k)
    record_pairing(ctx, progress, feed_store.hello())
    feed_store.inner = topology.open_store(ctx, feed_store.binding, ctx.spec.store, feed_store.codec)
    resume.check_packets(ctx, progress, schema.digest(feed_store.binding))
    announce(ctx)
    _check_space(ctx)
    history = train_stages(ctx, progress, topology.Feed(ctx, feed_store, "wire", feed_store.codec))
    feed_store.drain()
    stats = feed_store.stats()
    progress.teacher_samples += int(stats.pop("teacher_samples"))
    if ctx.writes:
        inner = feed_store.inner
        ctx.tracker.log_summary({**stats, "store/host_bytes": float(inner.nbytes if inner.kind == "memory" else 0),
                                 "store/disk_bytes": float(inner.nbytes if inner.kind == "disk" else 0),
                                 "store_peak_bytes": float(inner.nbytes),
                                 "packet_bytes_per_token": inner.nbytes / max(inner.index.rows * ctx.blocks.seq_len,
                                                                              1)})
    _drop_store(ctx, feed_store.inner)
    return _finish(ctx, progress, history)


def make_codec(ctx: RunContext, recipes: dict, M_DsDt) -> Codec:
    """The run's packet codec (fitted on the first window: supervision.fit_codec), its reconstruction error on an
    attribution batch, and the teacher forwards both cost, logged."""
    codec, passes = supervision.fit_codec(ctx, recipes, M_DsDt)
    if codec.lossless:
        return codec
    micro = ctx.cfg.data.micro_batch_size
    ids = datamod.micro_batch_ids(len(ctx.blocks), micro, ctx.info.world_size, ctx.info.rank, ATTRIBUTION_SEED, 0)
    errors = supervision.codec_error(ctx, codec, recipes, M_DsDt, datamod.take(ctx.blocks, ids))
    passes += micro * ctx.info.world_size / len(ctx.blocks)
    if ctx.writes:
        ctx.tracker.log_summary({**errors, "teacher_codec_passes_per_sample": passes})
        ctx.tracker.log_params({"codec.ranks": codec.describe()["ranks"]})
        worst = min((v for k, v in errors.items() if k.startswith("codec/cosine.")), default=1.0)
        _say(ctx, f"codec: compact, ranks {codec.describe()['ranks']}, {codec.target_bits}-bit targets; "
                  f"reconstruction cosine >= {worst:.3f} on an attribution batch")
    return codec


def _drop_store(ctx: RunContext, store) -> None:
    """The packets are not needed once every stage is trained: removed unless transport.keep_spool (this rank's
    store; the default <output_dir>/packets folder too once empty, never a folder the user named)."""
    if ctx.cfg.transport.keep_spool:
        store.close()
        return
    store.remove()
    distributed.barrier(ctx.group)
    default = topology.store_dir(ctx.cfg, ctx.out)
    if ctx.info.is_main and not ctx.cfg.transport.store_dir and default.is_dir() and not any(default.iterdir()):
        default.rmdir()


def _finish(ctx: RunContext, progress: Progress, history: list[dict]) -> dict:
    if ctx.writes:  # the peak of the transfer itself, before export and evaluation
        ctx.tracker.log_summary({"teacher_passes_per_sample": progress.teacher_samples / len(ctx.blocks),
                                 "host/peak_rss_bytes": throughput.peak_rss_bytes()})
    export_dir = export_student(ctx)
    return evaluate.evaluate_run(ctx, export_dir, report.stage_table(history) if history else "")


def teach(cfg: RunConfig) -> dict:
    """`semalign teach`: one teacher pass over the transfer data spools every stage's packets to
    transport.spool_dir (resumes an interrupted spool); returns the manifest."""
    if not cfg.transport.spool_dir:
        raise ValueError("`semalign teach` needs an output directory: --out DIR (transport.spool_dir)")
    cfg = resolved_models(cfg)
    info = _init(cfg)
    out = Path(cfg.transport.spool_dir)
    state = out / "teach.json"
    earlier = json.loads(state.read_text()) if state.is_file() else {}
    same = earlier.get("config_hash") == cfgmod.result_hash(cfg)
    progress = Progress(config_hash=cfgmod.result_hash(cfg), mlflow_run_id=earlier.get("mlflow_run_id") if same else None,
                        pairing_done=bool(same and earlier.get("pairing")))
    ctx, progress = prepare(cfg, info, role="writer", out=out, progress=progress)

    def body():
        table = pair_layers(ctx, progress)
        if ctx.writes:
            state.write_text(json.dumps({"config_hash": progress.config_hash, "pairing": True,
                                         "mlflow_run_id": progress.mlflow_run_id}))
        M_DsDt = mapping.build_map(ctx, table)
        announce(ctx, spool_bytes=ctx.spec.total_packet_bytes)
        layers = ctx.spec.trained_layers
        need = spool.space_needed(out, ctx.spec.total_packet_bytes)
        files.check_free_space(out, need, f"the spool ({len(ctx.blocks)} sequences x {ctx.blocks.seq_len} tokens)")
        recipes = _recipes(ctx, table, layers)
        codec = make_codec(ctx, recipes, M_DsDt)
        manifest = topology.write_spool(ctx, recipes, M_DsDt, supervision.binding(ctx, table, M_DsDt, codec), layers,
                                        codec)
        if ctx.writes:
            ctx.tracker.log_summary({"teacher_passes_per_sample": manifest["teacher_passes_per_sample"],
                                     "teach/emitted_samples": float(manifest["emitted_samples"]),
                                     "transport/spool_bytes_per_token": manifest["bytes_per_token"],
                                     "transport/spool_bytes": float(manifest["bytes"]),
                                     "store_peak_bytes": float(manifest["bytes"]),
                                     "packet_bytes_per_token": manifest["bytes"] / max(
                                         manifest["num_samples"] * manifest["seq_len"], 1),
                                     "transport/spool_write_s": manifest["spool_write_s"]})
        return manifest
    return _guarded(ctx, body)


# ---------------------------------------------------------------- setting up


def prepare(cfg: RunConfig, info: distributed.DistInfo, role: str = "colocated", out: Path | None = None,
            progress: Progress | None = None, group=None, mpu=None,
            roles: specmod.Roles | None = None) -> tuple[RunContext, Progress]:
    out = cfgmod.resolved_output_dir(cfg) if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = resume.read_progress(out, cfg) if cfg.runtime.resume else Progress(cfgmod.result_hash(cfg))
    main = info.is_main and role != "teacher"
    files.write_bytes(out / "config.yaml", cfgmod.to_yaml(cfg).encode(), "the resolved config") if main else None
    torch.manual_seed(cfg.seed)
    method = specmod.MethodSpec.from_config(cfg)
    tok_T = load_tokenizer(cfg.teacher.path, "teacher.path", cfg.teacher.trust_remote_code)
    tok_S = load_tokenizer(cfg.student.path, "student.path", cfg.student.trust_remote_code)
    student = _load_student(cfg, info, progress)
    teacher_config = load_config(cfg.teacher.path, "teacher.path", cfg.teacher.trust_remote_code)
    vocab = (supervision.vocab_map(cfg, tok_T, tok_S, student, int(teacher_config.get_text_config().vocab_size))
             if method.needs_teacher else supervision.VocabMap.none())
    caveats.warn(cfg, vocab.cross, main)
    if cfg.data.chat:  # conversations: each model's chat template, the answers-only mask (chat_blocks.py)
        from semalign_ds import chat_blocks

        blocks = chat_blocks.load(cfg, tok_S, tok_T, student.config, teacher_config, vocab.cross)
    else:
        blocks = _load_blocks(cfg, tok_S, student.config, teacher_config, tok_T if vocab.cross else None)
    _check_layers(cfg, teacher_config, student)
    spec = run_spec(cfg, info, teacher_config, student, len(blocks), vocab.cross, roles)
    hidden_T = int(teacher_config.get_text_config().hidden_size)
    teacher = None if role == "student" or not method.needs_teacher else _build_teacher(cfg, info, hidden_T, mpu)
    # the MLflow run exists only once everything loaded (a load error leaves none RUNNING); the directory's
    # marker names it, so a rerun continues it (runtime.resume=false starts over: a new one)
    run_id = (progress.mlflow_run_id or ownership.mlflow_run_id(out)) if cfg.runtime.resume else None
    tracker = make_tracker(cfg.tracking.enabled, main, cfg.tracking.uri, cfg.tracking.experiment,
                           tracking.run_name(cfg, info.world_size), out, run_id=run_id)
    progress.mlflow_run_id = tracker.run_id
    tracker.log_params(cfgmod.flatten(cfg))
    tracker.set_tags({"config_hash": cfgmod.result_hash(cfg), "world_size": info.world_size,
                      "topology": cfg.runtime.topology, "role": role})
    if main:
        ownership.note_mlflow_run(out, tracker.run_id)
        tracker.log_artifact(out / "config.yaml")
    ctx = RunContext(cfg, info, out, role, tracker, tok_T, tok_S, student, teacher, blocks, vocab, spec, group, mpu)
    return ctx, progress


def run_spec(cfg: RunConfig, info: distributed.DistInfo, teacher_config, student, num_sequences: int, cross: bool,
             roles: specmod.Roles | None = None) -> specmod.RunSpec:
    """This run's RunSpec (spec.resolve, as `semalign plan` computes it): both models' shapes, the world's roles
    (colocated and spool: every rank both), the packed sequences and this node's RAM."""
    import os

    from semalign_ds.planning.throughput import ModelShape

    if roles is None:
        topo = "spool" if cfg.runtime.topology == "spool" else "colocated"
        roles = specmod.Roles.build(topo, info.world_size, None, info.local_world_size)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return specmod.resolve(cfg, ModelShape.from_config(teacher_config), ModelShape.from_config(student.config),
                           roles, num_sequences, ram, cross)


def _check_layers(cfg: RunConfig, teacher_config, student) -> None:
    """Layer indices in the config against both models, before the teacher is loaded."""
    L_S = get_adapter(student).num_layers
    budgetmod.stage_list(cfg, L_S)
    L_T = int(teacher_config.get_text_config().num_hidden_layers)
    manual = cfg.pairing.manual
    if manual is not None and (len(manual) != L_S or not all(1 <= l <= L_T for l in manual)):
        raise ValueError(f"pairing.manual={manual} must list {L_S} teacher layers (one per student layer), "
                         f"each in 1..{L_T}")


def _load_student(cfg: RunConfig, info, progress: Progress) -> torch.nn.Module:
    path = progress.model_dir or cfg.student.path  # resume: the checkpoint's weights
    student = load_causal_lm(path, torch_dtype(cfg.student.dtype), info.device,
                             cfg.student.trust_remote_code, key="student.path")
    student.eval()  # dropout off: targets are matched deterministically and resume is exact
    for p in student.parameters():
        p.requires_grad_(False)
    return student


def _load_blocks(cfg: RunConfig, tok_S, student_config, teacher_config, tok_T=None) -> datamod.TokenBlocks:
    """The packed transfer data; with a different teacher tokenizer (tok_T) also the teacher's tokens of each block
    and the alignment (its length is checked against the teacher's positions there)."""
    from semalign_ds.models.loading import model_max_positions

    datamod.check_seq_len(cfg.data.seq_len, student_config, *([] if tok_T is not None else [teacher_config]))
    return datamod.pack_transfer(cfg.data, tok_S, tok_T, model_max_positions(teacher_config))


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


# ---------------------------------------------------------------- the plan of the run


def _check_space(ctx: RunContext) -> None:
    """The disk space the run will write (checkpoints, export, a disk packet store: the spec's bytes), before the
    teacher's pass."""
    disk = ctx.spec.store == "disk"
    space.check_run(ctx, ctx.spec.budget, topology.rank_store_dir(ctx.cfg, ctx.out, ctx.info.rank) if disk else None,
                    ctx.spec.store_bytes_per_rank if disk else 0)


def announce(ctx: RunContext, spool_bytes: int | None = None) -> None:
    """Print and log the run's plan (ctx.spec: stages, steps and tokens per stage, teacher passes per sample,
    packet bytes per token and per rank, the store)."""
    for line in ctx.spec.describe():
        _say(ctx, f"plan: {line}")
    params = ctx.spec.params()
    if spool_bytes is not None:
        params["plan.store_bytes"] = spool_bytes
    ctx.tracker.log_params(params)


def _log_teach(ctx: RunContext, progress: Progress, store, counts: dict) -> None:
    """The teach phase's metrics: passes per sample, teacher tokens/s (all ranks), token positions per weight pass
    and the effective host->device rate of an offloaded teacher (this rank), what the store holds."""
    if not ctx.writes:
        return
    seconds = max(counts["seconds"], 1e-9)
    metrics = {"teacher_passes_per_sample": progress.teacher_samples / len(ctx.blocks), "teach/seconds": seconds,
               "teach/emitted_samples": float(counts["samples"]), "teach/restored_samples": float(counts["restored"]),
               "store/host_bytes": float(store.nbytes if store.kind == "memory" else 0),
               "store/disk_bytes": float(store.nbytes if store.kind == "disk" else 0),
               "store_peak_bytes": float(store.nbytes),
               "packet_bytes_per_token": store.nbytes / max(store.index.rows * ctx.blocks.seq_len, 1)}
    if counts["passes"]:
        metrics.update(teacher_tokens_per_s=counts["tokens"] / seconds,
                       tokens_per_weight_pass=float(ctx.cfg.data.micro_batch_size * ctx.blocks.seq_len))
        if ctx.cfg.teacher_engine.offload != "none":
            param_bytes = throughput.teacher_param_bytes(ctx.teacher.model)
            metrics["h2d_gbps_effective"] = param_bytes * counts["passes"] / seconds / 1e9
    ctx.tracker.log_summary(metrics)  # run-level: a resumed run relogs only what changed


# ---------------------------------------------------------------- pairing


def pair_layers(ctx: RunContext, progress: Progress) -> PairingTable:
    """Attribution on the teacher over the transfer data, then the pairing table (saved; reused on resume)."""
    path = ctx.out / "pairing.json"
    if progress.pairing_done and path.is_file():
        return PairingTable.from_json(path.read_text())
    cfg = ctx.cfg
    L_T, L_S = ctx.teacher.adapter.num_layers, get_adapter(ctx.student).num_layers
    scores_abs = scores_signed = None
    meta = {}
    if cfg.pairing.manual is None and cfg.pairing.critical_layer:
        scores_abs, scores_signed, meta = _attribute(ctx, L_T)
    table = build_pairing(L_T, L_S, scores_abs, cfg.pairing.critical_layer, cfg.pairing.interpolate,
                          cfg.pairing.manual, scores_signed)
    table.meta.update(meta)
    record_pairing(ctx, progress, table)
    return table


def _attribute(ctx: RunContext, L_T: int) -> tuple[list[float], list[float] | None, dict]:
    """Teacher layer scores on pairing.attribution_batches micro-batches of pairing.attribution_micro_batch
    sequences per rank (its own micro-batch: grad x act keeps every layer's activations for the backward):
    (scores, signed scores or None, table meta). pairing.attribution grad_x_act: |grad x activation| (and signed);
    ablation: the rise of the teacher's LM loss with each layer's residual contribution removed (L_T + 1 forwards
    per batch, no backward). Scores are all-reduced over ranks."""
    cfg, info, N = ctx.cfg, ctx.info, len(ctx.blocks)
    micro = cfg.pairing.attribution_micro_batch or cfg.data.micro_batch_size
    n = min(cfg.pairing.attribution_batches, datamod.micro_batches_per_epoch(N, micro, info.world_size))
    batches = [datamod.take(ctx.blocks, datamod.micro_batch_ids(N, micro, info.world_size, info.rank,
                                                                ATTRIBUTION_SEED, i)) for i in range(n)]
    teacher_batches = bar([supervision.teacher_view(b) for b in batches], "attribution", ctx)
    passes = n * micro * info.world_size / N
    if cfg.pairing.attribution == "ablation":
        scores, clean = ctx.teacher.attribute_by_ablation(teacher_batches, range(1, L_T + 1))
        result = (scores.tolist(), None, {"attribution": "ablation", "clean_loss": clean})
        passes *= L_T + 1  # forwards only
    else:
        scores_abs, scores_signed = ctx.teacher.attribute(teacher_batches, range(1, L_T + 1))
        result = (scores_abs.tolist(), scores_signed.tolist(), {"attribution": "grad_x_act"})
    if ctx.writes:
        ctx.tracker.log_summary({"teacher_attribution_passes_per_sample": passes})
    return result


def record_pairing(ctx: RunContext, progress: Progress, table: PairingTable) -> None:
    """Save the pairing table (and its chart) with the run; a student of a split run gets it from the teacher."""
    path = ctx.out / "pairing.json"
    if ctx.writes:
        files.write_bytes(path, table.to_json().encode(), "the pairing table")
        ctx.tracker.log_artifact(path)
        if table.scores_abs:
            ctx.tracker.log_artifact(report.attribution_chart(table.scores_abs, _sources(table),
                                                              ctx.out / "attribution.png",
                                                              table.meta.get("attribution", "grad_x_act")))
    progress.pairing_done = True


def _recipes(ctx: RunContext, table: PairingTable, layers: list[int]) -> dict:
    recipes = target_recipes(_sources(table), ctx.cfg.method.residual, ctx.spec.method.target_kind)
    return {l: recipes[l] for l in layers}


def _sources(table: PairingTable) -> list:
    return [row.interp if row.interp else row.source_layer for row in table.rows]


# ---------------------------------------------------------------- training


def train_stages(ctx: RunContext, progress: Progress, feed) -> list[dict]:
    """Every stage still to train, its packets from `feed` (topology.py); checkpoints inside and between.
    Metrics go to MLflow on the run's global optimizer step (stage offsets from the plan); returns this process's
    rows of metrics (global `step`, `stage`, losses) for the loss curves and eval.md's per-stage table."""
    from semalign_ds.engines.student import StudentStage

    offset, history = 0, []
    for stage in ctx.spec.budget.stages:
        if stage.k not in progress.stages_done:
            student = StudentStage(ctx.student, stage.k,
                                   **stage_kwargs(ctx, stage.steps, list(stage.layers)))
            start = resume.resume_stage(ctx, progress, student, stage.k)
            source = feed.source(stage.k, list(stage.layers), start, stage.steps)
            _run_stage(ctx, progress, student, stage, start, offset, source, history)
            student.finish()
            progress.stages_done = sorted(set(progress.stages_done) | {stage.k})
            resume.save_boundary(ctx, progress)
            if ctx.writes:
                ctx.tracker.log_metrics(feed.stats(), step=offset + stage.steps)
        offset += stage.steps
    if ctx.writes and history:
        ctx.tracker.log_artifact(report.loss_curves(history, ctx.out / "loss_curves.png"))
    return history


def _run_stage(ctx: RunContext, progress: Progress, stage, plan_stage: budgetmod.Stage, start: int, offset: int,
               source, history: list) -> None:
    cfg, k, total = ctx.cfg, plan_stage.k, plan_stage.steps
    packets = iter(source)
    meter = throughput.RunMeter.for_run(ctx)  # source/student tokens/s, bytes per token
    logged = ctx.tracker.last_step("loss") if ctx.writes else 0  # steps replayed after a kill: not logged again
    what = f"student layer {k}" if len(plan_stage.layers) == 1 else f"student layers {list(plan_stage.layers)}"
    steps = bar(range(start, total), f"stage {k} ({what})", ctx, initial=start, total=total)
    on_signal = lambda done: resume.save_inside(ctx, progress, stage, done)  # noqa: E731  SIGTERM/USR1: checkpoint
    for step in signals.graceful_steps(steps, on_signal, ctx.group, ctx.info.device):
        t0 = time.perf_counter()
        metrics = {}
        for micro in range(cfg.schedule.grad_accum):
            packet = meter.source(next, packets, None)
            if packet is None:
                raise RuntimeError(f"the packet source of stage {k} ended before step {step + 1} of {total}")
            metrics = meter.student(stage.step, packet)
        seconds = time.perf_counter() - t0
        tokens = metrics["tokens"] * cfg.schedule.grad_accum * ctx.info.world_size
        metrics.update(stage=k, tokens_per_s=tokens / seconds, **meter.flush())
        history.append({**metrics, "step": offset + step + 1})
        if ctx.writes and offset + step + 1 > logged:
            ctx.tracker.log_metrics(metrics, step=offset + step + 1)
        if (step + 1) % cfg.runtime.checkpoint_every == 0 and step + 1 < total:
            resume.save_inside(ctx, progress, stage, step + 1)


def export_student(ctx: RunContext) -> Path:
    """The result: a plain Hugging Face checkpoint of the student (safetensors + tokenizer)."""
    export = ctx.out / "student"
    if ctx.writes:
        tmp = ctx.out / "student.tmp"
        size = sum(p.numel() * p.element_size() for p in ctx.student.parameters())
        with files.writing(export, size, "the student export", cleanup=[tmp]):
            ctx.student.save_pretrained(tmp, safe_serialization=True)
            ctx.tok_S.save_pretrained(tmp)
            resume.replace_dir(tmp, export)
        ctx.tracker.log_student_model(export, ctx.cfg.tracking.log_model, ctx.cfg.tracking.log_model_copy_max_mb)
    distributed.barrier(ctx.group)
    return export


def stage_kwargs(ctx: RunContext, total_steps: int, train_layers: list[int] | None = None) -> dict:
    """A stage's StudentStage arguments: the DeepSpeed ZeRO-2 config, the optimizer schedule, the objective of the
    spec's method, the adapter."""
    from semalign_ds.engines.ds_config import load_template, student_ds_config
    from semalign_ds.engines.student import ObjectiveSpec

    cfg, s = ctx.cfg, ctx.cfg.schedule
    template = load_template(resume.find_template(cfg.student_engine.ds_config, "student_engine.ds_config"))
    ds = student_ds_config(template, bf16=cfg.student.dtype == "bfloat16", micro_batch=cfg.data.micro_batch_size,
                           grad_accum=s.grad_accum, world_size=ctx.info.world_size, grad_clip=s.grad_clip,
                           hidden_size=get_adapter(ctx.student).hidden_size)
    m = ctx.spec.method
    objective = ObjectiveSpec(layer_objective=m.layer_objective, output_objective=m.output_objective, tau=m.tau,
                              w_layer=m.w_layer, w_out=m.w_out, w_label=m.w_label, target_kind=m.target_kind,
                              layer_balance=m.layer_balance, log_grad_cosine=m.log_grad_cosine)
    targets = s.lora_targets or list(get_adapter(ctx.student).family.lora_targets)
    return dict(ds_config=ds, lr=s.lr, warmup_steps=s.warmup_steps, total_steps=total_steps,
                weight_decay=s.weight_decay, adapter_kind=s.adapter, lora_rank=s.lora_rank,
                lora_alpha=s.lora_alpha, lora_targets=targets, objective=objective, train_layers=train_layers,
                teacher_hidden=ctx.spec.teacher.hidden if m.layer_objective == "hidden_mse" else None, mpu=ctx.mpu)
