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
    demo.add_argument("overrides", nargs="*", help="dotted overrides of configs/demo.yaml")
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
        if args.command == "demo":
            from semalign_ds import demo_run

            return demo_run.main(args.scale, args.cache_dir, args.overrides)
    except ValueError as err:
        print(f"semalign: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
