"""`semalign demo --chat`: distil on conversations. The instruction set is built here from the stdlib
(instructions.py); each model renders it with its own chat template, the losses cover the answers only, and the
demo prints the held-out answer loss (bits per byte of the answers) of the student before, the student after and
the teacher, and three held-out prompts with everyone's greedy answers (also the MLflow table generations.json).

Teachers: `demo` (the stdlib teacher: the same tokenizer, and the student's template shipped here for both, so the
teacher reads the student's rendering) or `smollm2` (SmolLM2-135M-Instruct with its own ChatML template: two
renderings aligned message by message). The demo student has no chat template of its own: it gets
student_chat_template.jinja (plain role headers, answers closed by its end-of-text token).
"""
from __future__ import annotations

import time
from pathlib import Path


from semalign_ds import config as cfgmod

STUDENT_TEMPLATE = Path(__file__).resolve().with_name("student_chat_template.jinja")
# ~3 conversations per 256-token block: 64 blocks hold ~200 of the ~800 training conversations. The student's steps
# are cheap, the teacher's one pass is not: many epochs on the answers. 12 epochs per stage (24 for the `best`
# preset's two-layer full stage) had the lowest validation answer loss of 4 / 8 / 12 / 16 with SmolLM2
# (docs/RESULTS.md).
CHAT_OVERRIDES = ["data.chat=true", "data.seq_len=256", "data.max_sequences=64", "data.micro_batch_size=8",
                  "schedule.epochs_per_stage=12", "schedule.warmup_steps=4", "pairing.attribution_batches=1",
                  "eval.max_sequences=64", "eval.batch_size=8", "eval.generations=3", "eval.max_new_tokens=48",
                  "runtime.checkpoint_every=16", "name=demo-chat"]
# SmolLM2 reads ~120-250 tokens/s on 2 CPU cores and its template adds a system prompt to every conversation:
# 48 blocks (~150 conversations, ~10k student and ~14k teacher tokens) keep its one pass to one or two minutes.
# Attribution on 2 sequences: its backward over 8 of them peaked at 7.4 GB of RAM (2.7 GB this way).
SMOLLM2_CHAT_OVERRIDES = ["data.max_sequences=48", "pairing.attribution_micro_batch=2", "name=demo-chat-smollm2"]
TINY_CHAT_OVERRIDES = ["data.seq_len=128", "data.max_sequences=8", "data.micro_batch_size=4",
                       "schedule.epochs_per_stage=1", "eval.max_sequences=8", "eval.batch_size=4",
                       "eval.max_new_tokens=8", "method.min_shared_tokens=100", "method.top_k=16"]


def chat_config(assets, chat_files: dict, scale: str, overrides: list[str], teacher_path=None) -> cfgmod.RunConfig:
    """configs/demo.yaml turned into a conversation run on the instruction set; `teacher_path`: SmolLM2's folder."""
    import yaml

    from semalign_ds.demo.runner import DEMO_CONFIG

    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["teacher"]["path"] = str(teacher_path or assets.teacher_path)
    raw["student"]["path"] = str(assets.student_path)
    raw["data"].update(path=str(chat_files["train"]), chat_template=str(STUDENT_TEMPLATE))
    if teacher_path is None:  # the stdlib teacher has no template either: the student's, so one rendering serves both
        raw["data"]["teacher_chat_template"] = str(STUDENT_TEMPLATE)
    raw.setdefault("eval", {})["sets"] = {"chat_test": str(chat_files["test"])}
    extra = [*CHAT_OVERRIDES, *(SMOLLM2_CHAT_OVERRIDES if teacher_path is not None else []),
             *(TINY_CHAT_OVERRIDES if scale == "tiny" else [])]
    return cfgmod.config_from_dict(raw, [*extra, *overrides])


def report(summary: dict, samples: int = 3) -> list[str]:
    """The answer loss before -> after (and the teacher's), and the first `samples` prompts with their answers."""
    lines = []
    for name, row in summary["answer_loss"].items():
        b, a = row["student_before"]["bits_per_byte"], row["student_after"]["bits_per_byte"]
        teacher = f"; teacher {row['teacher']['bits_per_byte']:.3f}" if "teacher" in row else ""
        lines.append(f"{name}: held-out answer loss {b:.3f} -> {a:.3f} bits per byte ({a / b - 1:+.1%}){teacher}")
    for i, row in enumerate(summary["generations"][:samples], 1):
        lines += ["", f"--- held-out prompt {i} ---", row["prompt"], f"reference:      {row['reference']!r}",
                  f"student before: {row['student_before']!r}", f"student after:  {row['student_after']!r}"]
        lines += [f"teacher:        {row['teacher']!r}"] if "teacher" in row else []
    return lines


def main(scale: str = "default", cache_dir: str | None = None, overrides: list[str] = (),
         teacher: str = "demo") -> int:
    from semalign_ds.demo import instructions
    from semalign_ds.demo.runner import demo_models
    from semalign_ds.run import guard, pipeline

    if teacher not in ("demo", "smollm2"):  # sized and measured for these two (docs/RESULTS.md)
        raise ValueError(f"`semalign demo --chat` runs with --teacher demo or smollm2, not {teacher!r}; run your own "
                         f"teacher on conversations with `semalign run` and data.chat: true")
    start = time.perf_counter()
    assets, teacher_path = demo_models(scale, cache_dir, teacher)
    chat_files = instructions.build_instruction_set(assets.cache_dir.parent)
    built = time.perf_counter() - start
    cfg = chat_config(assets, chat_files, scale, list(overrides), teacher_path)
    summary = guard.owned_run(cfg, "run", pipeline.run)
    print()
    print(summary["table"])
    print()
    for line in report(summary):
        print(line)
    total = time.perf_counter() - start
    print(f"\nwall time: {total:.0f} s (models and data ready after {built:.0f} s); student checkpoint: "
          f"{summary['student_dir']}; MLflow: {summary.get('tracking_uri', 'off')} (table generations.json)")
    return 0
