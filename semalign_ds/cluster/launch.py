"""The launch environment -> this process's place in the job: one function, `resolve_launch`.

Who started the process is read from the variables each launcher sets:
  torchrun            RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK GROUP_WORLD_SIZE MASTER_ADDR MASTER_PORT
                      (+ TORCHELASTIC_RUN_ID, which marks it)
  deepspeed launcher  RANK WORLD_SIZE LOCAL_RANK LOCAL_SIZE CROSS_RANK CROSS_SIZE MASTER_ADDR MASTER_PORT
  srun (one task per rank, as the slurm/ templates do)
                      SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_NODEID SLURMD_NODENAME SLURM_STEP_NODELIST
                      SLURM_STEP_TASKS_PER_NODE, SLURM_STEP_ID (marks a task of a job step), MASTER_ADDR and
                      MASTER_PORT (exported by the template); a heterogeneous job adds SLURM_HET_SIZE and
                      SLURM_NTASKS_HET_GROUP_<i> (component 0 = teacher ranks, component 1 = student ranks)
  by hand             all of RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT
  nothing             a single rank on a free local port.
A missing, malformed or inconsistent variable is a ValueError naming it and the fix. Which ranks are teacher or
student ranks is the run's business (`RankLayout` below, from runtime.topology and transport.teacher_ranks; pure,
so `semalign slurm render` checks it without importing torch).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SRUN_VARS = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID", "SLURMD_NODENAME")
_ADDR_HINT = ('the slurm/ templates export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) '
              "and MASTER_PORT before srun")


@dataclass(frozen=True)
class Launch:
    """This process's rank in the job and where the job's rendezvous is."""

    launcher: str  # torchrun | deepspeed | srun | env | single
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    node_name: str
    master_addr: str
    master_port: int

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed (env://) and DeepSpeed read."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def resolve_launch(env: Mapping[str, str], default_port: int | None = None) -> Launch:
    """Map a launch environment (e.g. os.environ) to this process's place in the job.

    default_port: the single-rank rendezvous port (None: a free one).
    """
    kind = _launcher(env)
    fields = {"torchrun": _torchrun, "deepspeed": _deepspeed, "srun": _srun, "env": _by_hand,
              "single": lambda e: _single(e, default_port)}[kind](env)
    return Launch(launcher=kind, **fields)


def _launcher(env: Mapping[str, str]) -> str:
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        return "deepspeed"
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return "srun"
    if "SLURM_JOB_ID" in env and _int(env, "SLURM_NTASKS", 1) > 1 and "RANK" not in env:
        raise ValueError(
            f"this process runs in Slurm job {env['SLURM_JOB_ID']} of SLURM_NTASKS={env['SLURM_NTASKS']} tasks but "
            "was not started by srun (SLURM_STEP_ID is unset): put `srun` in front of the semalign command so "
            "that each task is one rank (see slurm/colocated.sbatch)")
    if "RANK" in env or "WORLD_SIZE" in env:
        return "env"
    return "single"


# ---- one reader per launcher: each returns Launch's fields except launcher ----

def _torchrun(env: Mapping[str, str]) -> dict:
    f = _torch_common(env, "torchrun")
    f.update(local_world_size=_int(env, "LOCAL_WORLD_SIZE", f["world_size"]), node_rank=_int(env, "GROUP_RANK", 0),
             num_nodes=_int(env, "GROUP_WORLD_SIZE", 1))
    return _checked(f, "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE")


def _deepspeed(env: Mapping[str, str]) -> dict:
    f = _torch_common(env, "the deepspeed launcher")
    f.update(local_world_size=_int(env, "LOCAL_SIZE", f["world_size"]), node_rank=_int(env, "CROSS_RANK", 0),
             num_nodes=_int(env, "CROSS_SIZE", 1))
    return _checked(f, "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE")


def _by_hand(env: Mapping[str, str]) -> dict:
    f = _torch_common(env, "hand-set variables")
    f.update(local_world_size=_int(env, "LOCAL_WORLD_SIZE", f["world_size"]), node_rank=0, num_nodes=1)
    return _checked(f, "LOCAL_WORLD_SIZE", "node rank", "node count")


def _single(env: Mapping[str, str], default_port: int | None) -> dict:
    port = _int(env, "MASTER_PORT", default_port if default_port is not None else 0)
    if not port:
        from semalign_ds.cluster.distributed import free_port

        port = free_port()
    return dict(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, num_nodes=1,
                node_name=env.get("SLURMD_NODENAME", "localhost"), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=_port(str(port)))


def _torch_common(env: Mapping[str, str], who: str) -> dict:
    missing = [v for v in TORCH_VARS if not env.get(v)]
    if missing:
        raise ValueError(f"launch environment from {who} is incomplete: {', '.join(missing)} unset; start with "
                         f"torchrun, the deepspeed launcher or srun (slurm/ templates), or set all of "
                         f"{', '.join(TORCH_VARS)}")
    return dict(rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"), local_rank=_int(env, "LOCAL_RANK"),
                node_name=env.get("SLURMD_NODENAME", "localhost"), master_addr=env["MASTER_ADDR"],
                master_port=_port(env["MASTER_PORT"]))


def _srun(env: Mapping[str, str]) -> dict:
    missing = [v for v in SRUN_VARS if not env.get(v)]
    if missing:
        raise ValueError(f"srun task environment is incomplete: {', '.join(missing)} unset; launch the ranks with "
                         "srun inside an sbatch job (slurm/ templates)")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(var):
            raise ValueError(f"{var} is unset in this srun task; {_ADDR_HINT}")
    world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS"))
    if world != _int(env, "SLURM_NTASKS"):
        raise ValueError(f"SLURM_NTASKS={env['SLURM_NTASKS']} but SLURM_STEP_NUM_TASKS={world}: inconsistent srun "
                         "environment (was SLURM_NTASKS exported by hand?)")
    f = dict(rank=_int(env, "SLURM_PROCID"), world_size=world, local_rank=_int(env, "SLURM_LOCALID"),
             node_rank=_int(env, "SLURM_NODEID"), node_name=env["SLURMD_NODENAME"], master_addr=env["MASTER_ADDR"],
             master_port=_port(env["MASTER_PORT"]))
    _srun_agrees_with_torch_vars(env, f)
    _srun_nodes(env, f)
    _check_het_step(env, world)
    return _checked(f, "tasks on this node (SLURM_STEP_TASKS_PER_NODE)", "SLURM_NODEID", "SLURM_STEP_NUM_NODES")


def _srun_agrees_with_torch_vars(env: Mapping[str, str], f: dict) -> None:
    """RANK/WORLD_SIZE exported in the batch script reach every task unchanged: they must not contradict srun."""
    for var, key, slurm_var in (("RANK", "rank", "SLURM_PROCID"), ("WORLD_SIZE", "world_size", "SLURM_NTASKS"),
                                ("LOCAL_RANK", "local_rank", "SLURM_LOCALID")):
        if var in env and _int(env, var) != f[key]:
            raise ValueError(f"{var}={env[var]} contradicts {slurm_var}={f[key]} in this srun task; do not export "
                             f"{var} in the job script (srun gives each task its own rank)")


def _srun_nodes(env: Mapping[str, str], f: dict) -> None:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError("SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are unset in this srun task")
    nodes = expand_hostlist(nodelist)
    f["num_nodes"] = _int(env, "SLURM_STEP_NUM_NODES", len(nodes))
    if f["num_nodes"] != len(nodes):
        raise ValueError(f"SLURM_STEP_NUM_NODES={f['num_nodes']} but the step's node list {nodelist!r} has "
                         f"{len(nodes)} nodes")
    if f["node_rank"] >= len(nodes) or nodes[f["node_rank"]] != f["node_name"]:
        raise ValueError(f"SLURM_NODEID={f['node_rank']} and SLURMD_NODENAME={f['node_name']!r} disagree with the "
                         f"step's node list {nodelist!r} ({', '.join(nodes)})")
    per_node = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
    if per_node and len(per_node) != len(nodes):
        raise ValueError(f"SLURM_STEP_TASKS_PER_NODE lists {len(per_node)} nodes, the node list {len(nodes)}")
    if per_node and sum(per_node) != f["world_size"]:
        raise ValueError(f"SLURM_STEP_TASKS_PER_NODE adds up to {sum(per_node)} tasks, SLURM_NTASKS is "
                         f"{f['world_size']}")
    f["local_world_size"] = per_node[f["node_rank"]] if per_node else f["world_size"]


def _check_het_step(env: Mapping[str, str], world: int) -> None:
    """In a heterogeneous job, one step must span every component (teacher and student ranks in one world)."""
    size = _int(env, "SLURM_HET_SIZE", 1)
    if size <= 1:
        return
    if size != 2:
        raise ValueError(f"a heterogeneous job for semalign has 2 components (teacher, student), this one "
                         f"has {size} (SLURM_HET_SIZE)")
    tasks = tuple(_int(env, f"SLURM_NTASKS_HET_GROUP_{i}") for i in range(size))
    if sum(tasks) != world:
        raise ValueError(f"this step runs {world} tasks but the heterogeneous job's components have "
                         f"{' + '.join(map(str, tasks))}: start the ranks with `srun --het-group=0,1 ...` so one "
                         "step spans the teacher and the student components")


def _checked(f: dict, local_var: str, node_var: str, nodes_var: str) -> dict:
    if not 0 <= f["rank"] < f["world_size"]:
        raise ValueError(f"rank {f['rank']} is outside the world of {f['world_size']} ranks (0..{f['world_size'] - 1})")
    if not 0 <= f["local_rank"] < f["local_world_size"]:
        raise ValueError(f"local rank {f['local_rank']} is outside the {f['local_world_size']} ranks on this node "
                         f"({local_var})")
    if f["local_world_size"] > f["world_size"] or f["local_rank"] > f["rank"]:
        raise ValueError(f"local rank {f['local_rank']} / {f['local_world_size']} per node does not fit rank "
                         f"{f['rank']} of {f['world_size']}: inconsistent launch variables")
    if not 0 <= f["node_rank"] < f["num_nodes"]:
        raise ValueError(f"node rank {f['node_rank']} ({node_var}) is outside {f['num_nodes']} nodes ({nodes_var})")
    return f


# ---- Slurm's compact lists ----

def expand_hostlist(text: str) -> list[str]:
    """Slurm host list -> names, as `scontrol show hostnames` prints them: 'gpu[01-03,7],login' -> gpu01..."""
    names: list[str] = []
    for item in _split_top(text.strip()):
        names.extend(_expand_one(item))
    return names


def _split_top(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    if depth != 0 or any(not it for it in items):
        raise ValueError(f"malformed Slurm host list {text!r}")
    return items


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    out = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"malformed range {part!r} in Slurm host list {item!r}")
        for n in range(int(lo), int(hi or lo) + 1):
            out.extend(_expand_one(f"{head}{n:0{len(lo)}d}{tail}"))
    return out


def expand_tasks_per_node(text: str) -> list[int]:
    """SLURM_STEP_TASKS_PER_NODE '2(x3),1' -> [2, 2, 2, 1]; '' -> []."""
    out: list[int] = []
    for part in filter(None, text.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ValueError(f"malformed tasks-per-node list {text!r} (SLURM_STEP_TASKS_PER_NODE)")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _int(env: Mapping[str, str], var: str, default: int | None = None) -> int:
    if var not in env or env[var] == "":
        if default is None:
            raise ValueError(f"{var} is unset in the launch environment")
        return default
    try:
        return int(env[var])
    except ValueError:
        raise ValueError(f"{var}={env[var]!r} is not an integer") from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ValueError(f"MASTER_PORT={text!r} is not a port number (1..65535)")
    return port


@dataclass(frozen=True)
class RankLayout:
    """Which global ranks run the teacher and which the student.

    colocated / spool: every rank does both (teacher ZeRO-3 shard + student ZeRO-2 replica).
    disaggregated: the first `n_teacher` ranks are teacher ranks, the rest student ranks; any ratio.
    """

    world_size: int
    teacher_ranks: tuple[int, ...]
    student_ranks: tuple[int, ...]

    @classmethod
    def build(cls, topology: str, world_size: int, teacher_ranks: int | None = None) -> "RankLayout":
        if world_size < 1:
            raise ValueError(f"world size must be >= 1, got {world_size}")
        everyone = tuple(range(world_size))
        if topology in ("colocated", "spool"):
            if teacher_ranks not in (None, world_size):
                raise ValueError(f"transport.teacher_ranks={teacher_ranks} only applies to runtime.topology="
                                 f"disaggregated; with {topology} every rank is a teacher and a student rank")
            return cls(world_size, everyone, everyone)
        if topology != "disaggregated":
            raise ValueError(f"runtime.topology must be colocated, disaggregated or spool, got {topology!r}")
        if teacher_ranks is None:
            raise ValueError("runtime.topology=disaggregated needs transport.teacher_ranks (how many of the "
                             f"{world_size} ranks run the teacher)")
        if not 1 <= teacher_ranks < world_size:
            raise ValueError(f"transport.teacher_ranks={teacher_ranks} must leave at least one rank of the "
                             f"{world_size} for the student (1..{world_size - 1}); launch more tasks or lower it")
        return cls(world_size, everyone[:teacher_ranks], everyone[teacher_ranks:])

    @property
    def disaggregated(self) -> bool:
        return self.teacher_ranks != self.student_ranks

    def is_teacher(self, rank: int) -> bool:
        return rank in self.teacher_ranks

    def is_student(self, rank: int) -> bool:
        return rank in self.student_ranks
