"""The check pass before any work: every field's range, every path a run will read or write, all problems at
once (one ValueError listing each, with its key and its fix). `semalign config --check` runs it alone; `run`,
`teach` and `train` run it before the MLflow run is created and before any model loads.

Cheap checks only: config.json is read and directories are listed; no weights, tokenizer or data are loaded
(conversation data excepted: its records are parsed, so a malformed one is reported with its line before any work).
What each command needs:
    run (colocated, disaggregated)  teacher + student (config, family, safetensors weights, tokenizer files),
                                    data, eval sets, the teacher (ZeRO-3) and student (ZeRO-2) templates,
                                    output_dir (ownership: absent, empty or this config's, writable)
    train / run with topology spool the teacher's config and tokenizer (no weights: no teacher engine), student,
                                    data, eval sets, the student template, the spool to read, output_dir
    a method needing no teacher     (e.g. the sft preset) the teacher's config and tokenizer only, as for spool
    teach                           teacher + student, data, the teacher template, the spool directory to write
                                    (ownership kind spool); no eval sets (teach does not evaluate)
Checks that need the models' configs (layer indices, seq_len against max positions) run when both model
directories passed theirs. runtime.device=cuda needs a visible GPU (not checked by `config --check`, which may
run on a login node).
"""
from __future__ import annotations

import json
from pathlib import Path

from semalign_ds import chat
from semalign_ds import config as cfgmod
from semalign_ds import data as datamod
from semalign_ds.run import ownership
from semalign_ds.models import loading

COMMANDS = ("run", "train", "teach", "check")
_STAGE = {"teacher": (3, "ZeRO-3 inference", "ds_configs/teacher_zero3_offload_cpu.json"),
          "student": (2, "ZeRO-2 training", "ds_configs/student_zero2.json")}


def check_all(cfg: cfgmod.RunConfig, command: str = "run", world_size: int | None = None,
              config_problems: list[str] = ()) -> None:
    """ValueError listing every problem of `cfg` for `command` (see the module docstring); None if none.
    world_size (the launch's ranks) lets the DeepSpeed templates be checked against the batch sizes too;
    config_problems (the value problems config.parse found) come first in the same report."""
    found = [*config_problems, *problems(cfg, command, world_size)]
    if found:
        raise ValueError(cfgmod.format_problems(found))


def _replay_problems(found: list[str], data) -> None:
    """The replay documents' files (data.replay_path; its rules with data.replay_fraction are config validators)."""
    if data.replay_path:
        _collect(found, datamod.data_files, {"path": data.replay_path, "format": "auto"},
                 datamod.Keys("data.replay_path", None, "data.text_field"))


def problems(cfg: cfgmod.RunConfig, command: str = "run", world_size: int | None = None,
             before_submit: bool = False) -> list[str]:
    """Every problem of the paths and files `cfg` names for `command` (its values were checked when parsed).
    before_submit (`semalign slurm render` on a login node): no device check, and the spool a student job reads is
    not checked (its teacher job may not have written it yet; render checks that it can be read)."""
    assert command in COMMANDS, command
    reads_spool = command == "train" or (command in ("run", "check") and cfg.runtime.topology == "spool")
    from semalign_ds.spec import MethodSpec

    # the teacher's weights and engine template only where a teacher engine runs (config + tokenizer always: the
    # run reads the teacher's shape, and its tokenizer decides the alignment)
    teacher_engine = (command == "teach" or not reads_spool) and MethodSpec.from_config(cfg).needs_teacher
    found: list[str] = []
    models_ok = _model(found, cfg.teacher, "teacher", weights=teacher_engine)
    models_ok &= _model(found, cfg.student, "student", weights=True)
    if models_ok:
        _collect(found, _against_models, cfg)
    found += chat.config_problems(cfg, with_eval=command != "teach")  # conversation data (data.chat)
    if not cfg.data.chat:
        _collect(found, datamod.data_files, cfg.data, "data")
    _replay_problems(found, cfg.data)
    if command != "teach":
        for name, path in ({} if cfg.data.chat else cfg.eval.sets).items():
            _collect(found, datamod.data_files, {"path": path, "format": "auto"},
                     datamod.Keys(f"eval.sets.{name}", None, "data.text_field"))
        _collect(found, _template, cfg, "student", world_size)
    if teacher_engine:
        _collect(found, _template, cfg, "teacher", world_size)
    if reads_spool and not before_submit:
        _collect(found, spool_to_read, cfg.transport.spool_dir)
    if command != "check" and not before_submit:  # `config --check` may run on a login node without the job's GPUs (and without torch)
        from semalign_ds.cluster.distributed import resolve_device

        _collect(found, resolve_device, cfg.runtime.device)
    if command == "teach":
        _collect(found, _spool_to_write, cfg)
    else:
        _collect(found, ownership.check, cfgmod.resolved_output_dir(cfg), "run", cfgmod.result_hash(cfg))
    return found


def _collect(found: list[str], check, *args) -> bool:
    """Run one check; its ValueError becomes a line of the report. True if it passed."""
    try:
        check(*args)
    except ValueError as err:
        found.append(str(err))
        return False
    return True


def _model(found: list[str], model: cfgmod.ModelConfig, role: str, weights: bool) -> bool:
    """The model's folder, weights and tokenizer; True if the checks against its config.json can follow (a GGUF
    checkpoint is checked as a file here; its config exists only once converted, at load)."""
    key = f"{role}.path"
    if model.gguf_file:
        from semalign_ds.models.gguf import gguf_location

        _collect(found, gguf_location, model.path, model.gguf_file, role)
        return False
    ok = _collect(found, loading.check_model, model.path, key, weights, None)
    return ok and _collect(found, loading.check_tokenizer_files, model.path, key)


def _against_models(cfg: cfgmod.RunConfig) -> None:
    """Layer indices and seq_len against the two models' configs (config.json read as JSON: no transformers)."""
    conf_T = loading.json_config(cfg.teacher.path, "teacher.path")
    conf_S = loading.json_config(cfg.student.path, "student.path")
    datamod.check_seq_len(cfg.data.seq_len, conf_T, conf_S)
    L_T, L_S = (int(c.get_text_config().num_hidden_layers) for c in (conf_T, conf_S))
    bad = [k for k in cfg.schedule.stages or [] if not 1 <= k <= L_S]
    if bad:
        raise ValueError(f"schedule.stages {bad} out of range: the student has layers 1..{L_S}")
    manual = cfg.pairing.manual
    if manual is not None and (len(manual) != L_S or not all(1 <= l <= L_T for l in manual)):
        raise ValueError(f"pairing.manual={manual} must list {L_S} teacher layers (one per student layer), "
                         f"each in 1..{L_T}")


def _template(cfg: cfgmod.RunConfig, role: str, world_size: int | None) -> None:
    """The role's DeepSpeed template: it exists, is a JSON object, runs the right ZeRO stage, and the pure
    builder accepts it with this run's values; errors name the key and the template's path."""
    from semalign_ds.engines import ds_config as dsc  # pure functions, no deepspeed import
    from semalign_ds.engines.ds_config import find_template

    engine = cfg.teacher_engine if role == "teacher" else cfg.student_engine
    key = f"{role}_engine.ds_config"
    path = find_template(engine.ds_config, key)
    try:
        template = dsc.load_template(path)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
    stage, what, shipped = _STAGE[role]
    zero = template.get("zero_optimization")
    got = zero.get("stage", dsc.AUTO) if isinstance(zero, dict) else dsc.AUTO
    if got not in (dsc.AUTO, stage):
        raise ValueError(f"{key}={str(path)!r}: zero_optimization.stage is {got!r} but the {role} engine runs "
                         f"{what} (stage {stage}); set it to {stage} (or \"auto\"), or use {shipped}")
    ranks = _role_ranks(cfg, role, world_size)
    if ranks is None:
        template = {k: v for k, v in template.items() if k != "train_batch_size"}  # depends on the ranks
    try:
        _build(dsc, cfg, role, template, ranks or 1)
    except ValueError as err:
        raise ValueError(f"{key}={str(path)!r}: {err}") from None


def _role_ranks(cfg: cfgmod.RunConfig, role: str, world_size: int | None) -> int | None:
    if world_size is None:
        return None
    teachers = cfg.transport.teacher_ranks
    if cfg.runtime.topology != "disaggregated" or teachers is None or not 1 <= teachers < world_size:
        return world_size
    return teachers if role == "teacher" else world_size - teachers


def _build(dsc, cfg: cfgmod.RunConfig, role: str, template: dict, ranks: int) -> None:
    device = None if cfg.runtime.device == "auto" else cfg.runtime.device
    if role == "teacher":
        dsc.teacher_ds_config(template, offload=cfg.teacher_engine.offload, nvme_path=cfg.teacher_engine.nvme_path,
                              bf16=cfg.teacher.dtype == "bfloat16", micro_batch=cfg.data.micro_batch_size,
                              world_size=ranks, device=device)
    else:
        dsc.student_ds_config(template, bf16=cfg.student.dtype == "bfloat16", micro_batch=cfg.data.micro_batch_size,
                              grad_accum=cfg.schedule.grad_accum, world_size=ranks, grad_clip=cfg.schedule.grad_clip)


def spool_to_read(spool_dir: str) -> dict:
    """The manifest of a complete spool at `spool_dir` (`semalign train --from-spool`), or ValueError with the
    fix: a file or a run directory is not a spool; an unfinished one is finished by rerunning `teach`."""
    from semalign_ds.transport import schema, spool

    key = "transport.spool_dir (--from-spool)"
    if not spool_dir:
        raise ValueError("runtime.topology=spool needs transport.spool_dir: `semalign train --from-spool DIR`, "
                         "DIR written by `semalign teach --config X --out DIR`")
    path = Path(spool_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{key}={spool_dir!r} is a file, not a spool directory; point --from-spool at the "
                         f"directory `semalign teach --out` wrote")
    if not path.is_dir():
        raise ValueError(f"{key}={spool_dir!r} does not exist; write the spool first with "
                         f"`semalign teach --config X --out {spool_dir}`, or point --from-spool at one")
    marker = ownership.read(path)
    manifest = path / spool.MANIFEST
    if not manifest.is_file():
        from semalign_ds import lock

        writer = lock.holder(path)
        if writer:
            raise ValueError(f"the spool in {spool_dir!r} has no {spool.MANIFEST} yet: a job is writing it "
                             f"({lock.describe(writer)}); wait for it to finish")
        if marker and marker["kind"] == "run":
            raise ValueError(f"{key}={spool_dir!r} is a run's output directory, not a spool; point --from-spool at "
                             f"the directory `semalign teach --out` wrote")
        if marker:
            raise ValueError(_unfinished_spool(spool_dir, marker, spool.MANIFEST))
        raise ValueError(f"{key}={spool_dir!r} has no {spool.MANIFEST}: it is not a spool; point --from-spool at the "
                         f"directory `semalign teach --out` wrote")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{manifest} is not readable JSON ({err}); rewrite the spool with `semalign teach` into "
                         f"a new directory") from None
    if not isinstance(data, dict) or not data.get("complete"):
        raise ValueError(f"the spool in {spool_dir!r} is incomplete; rerun `semalign teach` with the same config "
                         f"and --out {spool_dir}")
    if str(data.get("schema")) != str(schema.SCHEMA_VERSION):
        raise ValueError(f"the spool in {spool_dir!r} has schema {data.get('schema')}, this semalign reads "
                         f"{schema.SCHEMA_VERSION}; rewrite it with this version's `semalign teach`")
    return data


def _unfinished_spool(spool_dir: str, marker: dict, manifest: str) -> str:
    """Why a marked spool that no job is writing has no manifest, by its teach's status: stopped, or damaged."""
    head = f"the spool in {spool_dir!r} has no {manifest}"
    status = marker.get("status")
    if status == "finished":
        return (f"{head} although its `semalign teach` finished: the manifest was deleted or lost; write the spool "
                f"again into a new --out directory (or delete {spool_dir} and rerun teach into it)")
    how = {"running": "was stopped before it finished (killed, or its node went down)",
           "killed": "was stopped by a signal", "failed": "failed"}.get(status, f"stopped (status {status})")
    return (f"{head}: its `semalign teach` {how}; rerun `semalign teach` with the same config and --out {spool_dir} "
            f"to finish it (it resumes from the shards already written)")


def _spool_to_write(cfg: cfgmod.RunConfig) -> None:
    if not cfg.transport.spool_dir:
        raise ValueError("`semalign teach` needs an output directory: --out DIR (transport.spool_dir)")
    ownership.check(cfg.transport.spool_dir, "spool", cfgmod.result_hash(cfg))
