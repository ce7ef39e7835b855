"""`semalign slurm render`: fill an sbatch template (slurm/*.sbatch) from a run config and say what it would submit.

The job script goes to stdout (redirect it into a file and `sbatch` that), the summary to stderr; nothing is
submitted. A template's run settings are shell lines of two forms, which render replaces with the values it knows:
    : "${NAME:?message}"          required: the job stops with the message when NAME is left unset
    NAME=${NAME:-default}         optional
The checks a job would otherwise fail on after queueing: the config file exists; the check pass of the command
the job runs (checks.py: models, data, eval sets, DeepSpeed templates, output directory; a config whose paths
are still placeholders is refused here, not after the job waited in the queue; `--no-check` skips it for paths
that only the compute nodes see); the teacher/student split fits the job's tasks (Roles, whole nodes per
role); the spool directory is one the student job can read.
The job's size: `--nodes` / `--gpus-per-node` (the flags `semalign plan` takes) rewrite the template's
`#SBATCH --nodes`, `--ntasks-per-node` and `--gpus-per-node` lines (a het job: `--nodes T,S`, teacher and student
components); without them the template's lines stand, and the summary says so.
"""
from __future__ import annotations

import os
import re
import shlex
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from semalign_ds import config as cfgmod
from semalign_ds.spec import Roles

SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"
TEMPLATES = {
    "colocated": "one job; every rank holds a teacher shard and a student replica (runtime.topology colocated)",
    "hetjob": "a heterogeneous job: teacher nodes stream packets to student nodes (disaggregated)",
    "spool_teacher": "`semalign teach`: the teacher runs once and writes a spool directory (spool)",
    "spool_student": "`semalign train --from-spool`: the student trains from that spool, after the teacher job",
}
_REQUIRED = re.compile(r'^: "\$\{(\w+):\?(.*)\}"\s*(#.*)?$')
_OPTIONAL = re.compile(r"^(\w+)=\$\{(\w+):-(.*?)\}\s*(#.*)?$")
_EXAMPLE_SITE = {"partition": "gpu", "account": "my-account"}
_NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/scratch/local", "/local")


@dataclass
class Component:
    """One #SBATCH block (a heterogeneous job has one per `#SBATCH hetjob`)."""

    options: dict[str, str] = field(default_factory=dict)

    def nodes(self) -> int:
        text = self.options.get("nodes", "1")
        return _int_option(text.split("-")[0], "--nodes")

    def tasks(self) -> int:
        if "ntasks" in self.options:
            return _int_option(self.options["ntasks"], "--ntasks")
        return self.nodes() * _int_option(self.options.get("ntasks-per-node", "1"), "--ntasks-per-node")

    def per_node(self) -> int:
        return max(1, self.tasks() // self.nodes())


@dataclass
class Template:
    name: str
    path: Path
    text: str
    kind: str  # colocated | hetjob | spool_teacher | spool_student
    components: list[Component]


def main(args) -> int:
    """CLI entry (`semalign slurm render --config X --template Y [--nodes N] [--gpus-per-node G] [overrides]`);
    `--template` without a name lists the shipped templates."""
    if args.template == "":
        print(f"the shipped templates (in {SLURM_DIR}); render one with --template NAME, or pass the path of an "
              f"edited copy:\n{template_list()}")
        return 0
    if not args.config:
        raise ValueError("slurm render needs --config YAML (the run config the job runs)")
    nodes = _node_counts(args.nodes) if args.nodes else None
    script, summary = render(args.config, args.template, list(args.overrides), nodes=nodes,
                             gpus_per_node=args.gpus_per_node, check=not args.no_check)
    print(script, end="")
    print(summary, file=sys.stderr)
    return 0


def _node_counts(text: str) -> list[int]:
    counts = [_int_option(part.strip(), "--nodes") for part in str(text).split(",")]
    if len(counts) > 2:
        raise ValueError(f"--nodes {text!r}: one count (N), or two for a het job (teacher,student)")
    return counts


def render(config_path: str, template: str | None, overrides: list[str], cwd: Path | None = None,
           nodes: list[int] | None = None, gpus_per_node: int | None = None, check: bool = True) -> tuple[str, str]:
    """(filled job script, human summary of what it would submit); ValueError on anything the job would fail on.
    nodes / gpus_per_node: the job's size (None: the template's #SBATCH lines); check: the command's check pass."""
    cwd = Path(cwd or os.getcwd()).resolve()
    tpl = resize(load_template(template), nodes, gpus_per_node)
    config_file = _abs(config_path, cwd)
    cfg = cfgmod.load_config(config_file, overrides)
    _check_overrides(overrides)
    layout = check_layout(tpl, cfg)
    if check:
        _check_pass(cfg, tpl, layout)
    values = {"SEMALIGN_CONFIG": str(config_file), "SEMALIGN_WORKDIR": str(cwd),
              "SEMALIGN_PYTHON": sys.executable, "SEMALIGN_OVERRIDES": " ".join(overrides)}
    notes = [] if check else ["note: --no-check: the config's paths were not checked here (the job checks them "
                              "at its start)"]
    if tpl.kind.startswith("spool"):
        spool = spool_dir(cfg, cwd)
        notes += check_spool(spool, tpl.kind)
        values["SEMALIGN_SPOOL_DIR"] = str(spool)
    script, unfilled = fill(tpl, values, cfg, config_file)
    sized = "--nodes/--gpus-per-node" if nodes or gpus_per_node else None
    return script, summary(tpl, layout, cfg, values, unfilled, notes, sized)


def _check_pass(cfg: cfgmod.RunConfig, tpl: Template, layout: Roles) -> None:
    """The check pass of the command the job runs, as the job would run it at its start (no GPU check: this is
    a login node; a spool the student job reads may not be written yet)."""
    from semalign_ds.run import checks

    command = {"spool_teacher": "teach", "spool_student": "train"}.get(tpl.kind, "run")
    found = checks.problems(cfg, command, layout.world_size, before_submit=True)
    if found:
        raise ValueError(f"the job would stop at its start: {cfgmod.format_problems(found)}\n(fix the config, or "
                         f"pass the paths as overrides, e.g. teacher.path=/abs/checkpoint; --no-check renders "
                         f"anyway when the paths exist only on the compute nodes)")


_SIZE_LINES = {"nodes": re.compile(r"^(#SBATCH\s+--nodes[= ])(\S+)(.*)$"),
               "ntasks-per-node": re.compile(r"^(#SBATCH\s+--ntasks-per-node[= ])(\S+)(.*)$"),
               "gpus-per-node": re.compile(r"^(#SBATCH\s+--gpus-per-node[= ])(\S+)(.*)$")}


def resize(tpl: Template, nodes: list[int] | None, gpus_per_node: int | None) -> Template:
    """The template with its size lines rewritten: nodes per component, one task (rank) per GPU."""
    if not nodes and gpus_per_node is None:
        return tpl
    if nodes and len(nodes) != len(tpl.components):
        form = "--nodes T,S (teacher, student nodes)" if len(tpl.components) == 2 else "--nodes N"
        raise ValueError(f"--nodes gives {len(nodes)} count(s) but template {tpl.path} has {len(tpl.components)} "
                         f"component(s): use {form}")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node={gpus_per_node} must be >= 1 (one rank per GPU)")
    want = {"nodes": nodes, "ntasks-per-node": gpus_per_node, "gpus-per-node": gpus_per_node}
    lines, comp, seen = tpl.text.splitlines(), 0, set()
    for i, line in enumerate(lines):
        if re.match(r"^#SBATCH\s+(hetjob|packjob)\b", line):
            comp += 1
        for option, pattern in _SIZE_LINES.items():
            value = want[option][comp] if option == "nodes" and nodes else None if option == "nodes" \
                else gpus_per_node
            m = pattern.match(line)
            if m and value is not None:
                lines[i] = f"{m.group(1)}{value}{m.group(3)}"
                seen.add((option, comp))
    missing = [f"--{o} (component {c})" for o in _SIZE_LINES for c in range(len(tpl.components))
               if want[o] and (o, c) not in seen]
    if missing:
        raise ValueError(f"template {tpl.path} has no #SBATCH line for {', '.join(missing)} to set; add one (as in "
                         f"the shipped templates) or drop --nodes/--gpus-per-node")
    text = "\n".join(lines) + "\n"
    return Template(tpl.name, tpl.path, text, tpl.kind, parse_sbatch(text))


def template_list() -> str:
    return "\n".join(f"  {name:<14} {what}" for name, what in TEMPLATES.items())


def load_template(template: str | None) -> Template:
    """A shipped template by name (colocated, hetjob, spool_teacher, spool_student) or a path to an edited copy."""
    if not template:
        raise ValueError(f"slurm render needs --template NAME or PATH; the shipped templates (in {SLURM_DIR}):\n"
                         f"{template_list()}")
    path = SLURM_DIR / f"{template}.sbatch" if template in TEMPLATES else Path(template)
    if not path.is_file():
        raise ValueError(f"unknown template {template!r}: use one of {', '.join(TEMPLATES)} or the path of an "
                         f"sbatch file (the shipped ones are in {SLURM_DIR}):\n{template_list()}")
    text = path.read_text()
    if "#SBATCH" not in text or "semalign_ds.cli" not in text:
        raise ValueError(f"template {str(path)!r} is not a semalign job script (no #SBATCH lines or no "
                         "`-m semalign_ds.cli` srun line); start from one in slurm/")
    return Template(template, path, text, _kind(text), parse_sbatch(text))


def _kind(text: str) -> str:
    if re.search(r"semalign_ds\.cli\s+teach\b", text):
        return "spool_teacher"
    if "--from-spool" in text:
        return "spool_student"
    if re.search(r"^#SBATCH\s+(hetjob|packjob)\b", text, re.M):
        return "hetjob"
    return "colocated"


def parse_sbatch(text: str) -> list[Component]:
    """#SBATCH lines -> one Component per job component (long option names; -N/-n/-p/-A/-t/-J too)."""
    short = {"N": "nodes", "n": "ntasks", "p": "partition", "A": "account", "t": "time", "J": "job-name",
             "o": "output", "G": "gpus", "c": "cpus-per-task"}
    comps = [Component()]
    for line in text.splitlines():
        if not line.startswith("#SBATCH"):
            continue
        words = shlex.split(line[len("#SBATCH"):], comments=True)
        if words[:1] in (["hetjob"], ["packjob"]):
            comps.append(Component())
            continue
        while words:
            word = words.pop(0)
            key, _, value = word.lstrip("-").partition("=")
            key = short.get(key, key) if not word.startswith("--") else key
            if not value and words and not words[0].startswith("-"):
                value = words.pop(0)
            comps[-1].options[key] = value
    return comps


def check_layout(tpl: Template, cfg: cfgmod.RunConfig) -> Roles:
    """The teacher/student split against the template's tasks (Roles), as the job would find it."""
    comps = tpl.components
    if tpl.kind == "hetjob":
        if len(comps) != 2:
            raise ValueError(f"template {tpl.path} has {len(comps)} components; a heterogeneous semalign job has 2 "
                             "(teacher, student) separated by `#SBATCH hetjob`")
        teacher = comps[0].tasks()
        if cfg.transport.teacher_ranks not in (None, teacher):
            raise ValueError(f"transport.teacher_ranks={cfg.transport.teacher_ranks} does not match the hetjob's "
                             f"teacher component: {comps[0].nodes()} nodes x {comps[0].per_node()} tasks = {teacher} "
                             f"ranks; drop transport.teacher_ranks (the template passes it) or resize the component")
        return Roles.build("disaggregated", teacher + comps[1].tasks(), teacher)
    world = comps[0].tasks()
    if tpl.kind.startswith("spool"):
        return Roles.build("spool", world)
    if cfg.runtime.topology == "spool":
        raise ValueError("runtime.topology=spool runs as two jobs: render --template spool_teacher and "
                         "--template spool_student (or set runtime.topology=colocated)")
    layout = Roles.build(cfg.runtime.topology, world, cfg.transport.teacher_ranks)
    per_node = comps[0].per_node()
    if layout.disaggregated and len(layout.teacher_ranks) % per_node:
        raise ValueError(f"transport.teacher_ranks={len(layout.teacher_ranks)} does not divide the job's "
                         f"{comps[0].nodes()} nodes x {per_node} tasks at a node boundary (a node would hold "
                         f"teacher and student ranks); use a multiple of {per_node}, or slurm/hetjob.sbatch")
    return layout


def spool_dir(cfg: cfgmod.RunConfig, cwd: Path) -> Path:
    if not cfg.transport.spool_dir:
        raise ValueError("transport.spool_dir is empty: the spool templates need it (set it in the config or pass "
                         "transport.spool_dir=DIR to render), on storage both jobs' nodes share")
    return _abs(cfg.transport.spool_dir, cwd)


def check_spool(spool: Path, kind: str) -> list[str]:
    """Refuse a spool directory the job could not use; return notes for the summary."""
    notes = []
    if str(spool).startswith(_NODE_LOCAL):
        notes.append(f"note: {spool} looks node-local; the student job's nodes must see the teacher's spool")
    if spool.exists() and not spool.is_dir():
        raise ValueError(f"transport.spool_dir={str(spool)!r} is not a directory; point it at a spool directory")
    if kind == "spool_student":
        if not spool.exists():
            notes.append(f"note: {spool} does not exist yet: the teacher job writes it; submit this job with "
                         "--dependency=afterok:<teacher job id>")
        elif not _can(spool, os.R_OK | os.X_OK, 0o5):
            raise ValueError(f"transport.spool_dir={str(spool)!r} is not readable by this user (mode "
                             f"{stat.filemode(spool.stat().st_mode)}): the student job could not read the spool; "
                             f"fix its permissions (chmod -R u+rX, or g+rX for a shared group)")
        return notes
    target = spool if spool.exists() else _existing_parent(spool)
    if not _can(target, os.W_OK | os.X_OK, 0o3):
        raise ValueError(f"transport.spool_dir={str(spool)!r}: {target} is not writable by this user, so the "
                         "teacher job could not write the spool; choose a directory you can write")
    return notes


def _can(path: Path, mode: int, bits: int) -> bool:
    """os.access, and the permission bits of this user's class too (root passes os.access on any local file,
    but a job on a root-squashed shared filesystem would not)."""
    st = path.stat()
    if os.geteuid() == st.st_uid:
        cls = st.st_mode >> 6
    elif st.st_gid in os.getgroups() or st.st_gid == os.getegid():
        cls = st.st_mode >> 3
    else:
        cls = st.st_mode
    return os.access(path, mode) and (cls & bits) == bits


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def fill(tpl: Template, values: dict[str, str], cfg: cfgmod.RunConfig, config_file: Path) -> tuple[str, list[str]]:
    """Replace the run-setting lines render has values for, and the job name; returns (script, names left unset)."""
    out, unfilled = [], []
    mark = f"# filled by semalign slurm render from {config_file}"
    for line in tpl.text.splitlines():
        m = _REQUIRED.match(line) or _OPTIONAL.match(line)
        name = m.group(1) if m else None
        if name in values:
            line = f"{name}={shlex.quote(values[name])}   {mark}"
        elif m and _REQUIRED.match(line):
            unfilled.append(name)
        elif re.match(r"^#SBATCH\s+--job-name=", line):
            suffix = {"spool_teacher": "-teach", "spool_student": "-train"}.get(tpl.kind, "")
            line = f"#SBATCH --job-name={cfg.name}{suffix}"
        out.append(line)
    return "\n".join(out) + "\n", unfilled


def summary(tpl: Template, layout: Roles, cfg: cfgmod.RunConfig, values: dict[str, str],
            unfilled: list[str], notes: list[str], sized: str | None = None) -> str:
    roles = ("teacher", "student") if tpl.kind == "hetjob" else ("all ranks",)
    lines = [f"semalign slurm render: nothing was submitted. Save the script above (e.g. > job.sbatch) and run "
             f"`sbatch job.sbatch`{' --dependency=afterok:<teacher job id>' if tpl.kind == 'spool_student' else ''}.",
             f"template {tpl.path} ({tpl.kind}) would ask Slurm for:"]
    for role, comp in zip(roles, tpl.components):
        o = comp.options
        lines.append(f"  {role}: {comp.nodes()} nodes x {comp.per_node()} tasks, GPUs/node "
                     f"{o.get('gpus-per-node', '-')}, partition {o.get('partition', '(default)')}, account "
                     f"{o.get('account', '(default)')}, time {o.get('time', '(default)')}")
    lines.append(f"size: from {sized}" if sized else "size: the template's #SBATCH lines (set it with --nodes N "
                 "--gpus-per-node G, the flags `semalign plan` takes)")
    lines.append(f"ranks: {layout.world_size}" + (
        f" (teacher {_span(layout.teacher_ranks)}, student {_span(layout.student_ranks)})" if layout.disaggregated
        else " (each a teacher shard and a student replica)" if tpl.kind == "colocated" else ""))
    lines.append(f"each rank runs: {_command(tpl, values, layout)}")
    out = cfgmod.resolved_output_dir(cfg)
    lines.append(f"output: {out if out.is_absolute() else Path(values['SEMALIGN_WORKDIR']) / out} (checkpoint/, "
                 "student/, MLflow); a requeued job resumes from its last checkpoint")
    example = [f"--{k}={v}" for k, v in _EXAMPLE_SITE.items()
               if any(c.options.get(k) == v for c in tpl.components)]
    if example:
        lines.append(f"SITE lines still at the template's examples: {', '.join(example)}: edit them, or pass your "
                     "own on the sbatch command line (it overrides #SBATCH lines)")
    if unfilled:
        lines.append(f"left unset (the job stops with a message unless you export them): {', '.join(unfilled)}")
    return "\n".join(lines + notes)


def _command(tpl: Template, values: dict[str, str], layout: Roles) -> str:
    """The template's srun line with the run settings (and a het job's teacher task count) filled in."""
    srun = next((l for l in tpl.text.splitlines() if l.lstrip().startswith("srun ")), "").rstrip(" &")
    values = {**values, "SLURM_NTASKS_HET_GROUP_0": str(len(layout.teacher_ranks))}
    for name, value in values.items():
        srun = srun.replace(f'"${name}"', shlex.quote(value)).replace(f"${name}", value)
    return srun.strip()


def _span(ranks: tuple[int, ...]) -> str:
    return f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])


def _check_overrides(overrides: list[str]) -> None:
    for text in overrides:
        if any(ch.isspace() for ch in text):
            raise ValueError(f"override {text!r} contains whitespace; the job script passes overrides as words: "
                             "write it without spaces, e.g. schedule.stages=[1,2]")


def _abs(path: str | Path, cwd: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (cwd / p)


def _int_option(text: str, option: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"#SBATCH {option}={text!r} is not a number; render needs a plain count") from None
    if value < 1:
        raise ValueError(f"#SBATCH {option}={value} must be >= 1")
    return value
