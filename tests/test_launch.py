"""launch.resolve_launch: every launcher's variables -> this process's rank, for large jobs, without processes;
Roles: the teacher/student split of a world."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from semalign_ds.cluster import distributed
from semalign_ds.cluster.launch import expand_hostlist, expand_tasks_per_node, parse_hostlist, resolve_launch
from semalign_ds.spec import Roles


def srun_env(rank: int, nodes: int, per_node: int, prefix: str = "gpu", **extra) -> dict[str, str]:
    """What srun gives task `rank` of a block-distributed step of nodes x per_node tasks (one rank per GPU)."""
    node = rank // per_node
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
           "SLURM_NTASKS": str(nodes * per_node), "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
           "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(node), "SLURMD_NODENAME": f"{prefix}{node + 1:03d}",
           "SLURM_STEP_NODELIST": f"{prefix}[001-{nodes:03d}]", "SLURM_JOB_NODELIST": f"{prefix}[001-{nodes:03d}]",
           "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
           "MASTER_ADDR": f"{prefix}001", "MASTER_PORT": "24242"}
    env.update(extra)
    return env


def het_env(rank: int, teacher_nodes: int = 12, student_nodes: int = 4, per_node: int = 8, **extra) -> dict[str, str]:
    """A task of `srun --het-group=0,1` in a heterogeneous job: component 0 teacher nodes, 1 student nodes."""
    nodes = teacher_nodes + student_nodes
    env = srun_env(rank, nodes, per_node, SLURM_HET_SIZE="2",
                   SLURM_NTASKS_HET_GROUP_0=str(teacher_nodes * per_node),
                   SLURM_NTASKS_HET_GROUP_1=str(student_nodes * per_node),
                   SLURM_JOB_NODELIST_HET_GROUP_0=f"gpu[001-{teacher_nodes:03d}]",
                   SLURM_JOB_NODELIST_HET_GROUP_1=f"gpu[{teacher_nodes + 1:03d}-{nodes:03d}]")
    env.update(extra)
    return env


def torchrun_env(rank: int, nodes: int, per_node: int, **extra) -> dict[str, str]:
    env = {"TORCHELASTIC_RUN_ID": "none", "RANK": str(rank), "WORLD_SIZE": str(nodes * per_node),
           "LOCAL_RANK": str(rank % per_node), "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(rank // per_node),
           "GROUP_WORLD_SIZE": str(nodes), "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    env.update(extra)
    return env


def deepspeed_env(rank: int, nodes: int, per_node: int, **extra) -> dict[str, str]:
    env = {"RANK": str(rank), "WORLD_SIZE": str(nodes * per_node), "LOCAL_RANK": str(rank % per_node),
           "LOCAL_SIZE": str(per_node), "CROSS_RANK": str(rank // per_node), "CROSS_SIZE": str(nodes),
           "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    env.update(extra)
    return env


def test_srun_16_nodes_x_8_gpus_teacher_12_nodes_student_4():
    launches = [resolve_launch(srun_env(r, 16, 8)) for r in range(128)]
    layout = Roles.build("disaggregated", 128, 96)
    assert [l.rank for l in launches] == list(range(128))
    assert {l.launcher for l in launches} == {"srun"} and {l.world_size for l in launches} == {128}
    for l in launches:
        assert l.local_rank == l.rank % 8 and l.local_world_size == 8 and l.num_nodes == 16
        assert l.node_name == f"gpu{l.node_rank + 1:03d}" and l.master_addr == "gpu001" and l.master_port == 24242
        # teacher ranks fill whole nodes 1..12, student ranks nodes 13..16
        assert layout.is_teacher(l.rank) == (l.node_rank < 12) != layout.is_student(l.rank)
    assert layout.teacher_ranks == tuple(range(96)) and layout.student_ranks == tuple(range(96, 128))
    assert launches[77].torch_env() == {"RANK": "77", "WORLD_SIZE": "128", "LOCAL_RANK": "5",
                                        "MASTER_ADDR": "gpu001", "MASTER_PORT": "24242"}


def test_colocated_every_rank_is_teacher_and_student():
    layout = Roles.build("colocated", 128)
    assert not layout.disaggregated and layout.is_teacher(100) and layout.is_student(100)


def test_het_job_step_spans_both_components():
    launches = [resolve_launch(het_env(r)) for r in range(128)]
    assert [l.rank for l in launches] == list(range(128)) and {l.world_size for l in launches} == {128}


@pytest.mark.parametrize("env, needle", [
    # srun --het-group=0 only: the step spans the teacher component alone
    (srun_env(3, 12, 8, SLURM_HET_SIZE="2", SLURM_NTASKS_HET_GROUP_0="96", SLURM_NTASKS_HET_GROUP_1="32"),
     "--het-group=0,1"),
    (het_env(3, SLURM_HET_SIZE="3", SLURM_NTASKS_HET_GROUP_2="0"), "SLURM_HET_SIZE"),
])
def test_het_job_mismatches_are_errors(env, needle):
    with pytest.raises(ValueError, match=needle):
        resolve_launch(env)


def test_torchrun_variables_even_inside_srun():
    launch = resolve_launch(torchrun_env(13, 2, 8))
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 13, 16, 5)
    assert (launch.node_rank, launch.num_nodes, launch.local_world_size) == (1, 2, 8)
    # srun starting one torchrun per node: torchrun's per-process variables win over the node task's SLURM_*
    inside = resolve_launch(torchrun_env(13, 2, 8, **srun_env(1, 2, 1, prefix="node")))
    assert (inside.launcher, inside.rank, inside.world_size, inside.node_name) == ("torchrun", 13, 16, "node002")


def test_deepspeed_launcher_variables():
    launch = resolve_launch(deepspeed_env(21, 4, 8))
    assert (launch.launcher, launch.rank, launch.local_rank, launch.node_rank, launch.num_nodes) == \
        ("deepspeed", 21, 5, 2, 4)


def test_hand_set_and_single_rank():
    by_hand = resolve_launch({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                              "MASTER_PORT": "1234"})
    assert (by_hand.launcher, by_hand.rank, by_hand.world_size) == ("env", 1, 2)
    single = resolve_launch({}, default_port=4321)
    assert (single.launcher, single.rank, single.world_size, single.master_port) == ("single", 0, 1, 4321)
    assert single.master_addr == "127.0.0.1"
    # a 1-task sbatch job running semalign directly (no srun) is a single rank too
    assert resolve_launch({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).launcher == "single"


def _without(env: dict, *names: str) -> dict:
    return {k: v for k, v in env.items() if k not in names}


@pytest.mark.parametrize("env, needle", [
    (_without(srun_env(3, 2, 4), "MASTER_ADDR"), "MASTER_ADDR is unset.*scontrol show hostnames"),
    (_without(srun_env(3, 2, 4), "MASTER_PORT"), "MASTER_PORT is unset"),
    (_without(srun_env(3, 2, 4), "SLURM_NODEID", "SLURMD_NODENAME"), "SLURM_NODEID, SLURMD_NODENAME unset"),
    (srun_env(3, 2, 4, SLURM_LOCALID="x"), "SLURM_LOCALID='x' is not an integer"),
    (srun_env(3, 2, 4, MASTER_PORT="99999"), "MASTER_PORT='99999' is not a port"),
    (srun_env(3, 2, 4, RANK="0"), "RANK=0 contradicts SLURM_PROCID=3"),
    (srun_env(3, 2, 4, SLURM_NTASKS="16"), "SLURM_NTASKS=16 but SLURM_STEP_NUM_TASKS=8"),
    (srun_env(3, 2, 4, SLURMD_NODENAME="gpu002"), "SLURM_NODEID=0 and SLURMD_NODENAME='gpu002' disagree"),
    (srun_env(3, 2, 4, SLURM_LOCALID="4"), "local rank 4 is outside the 4 ranks on this node"),
    (srun_env(3, 2, 4, SLURM_STEP_TASKS_PER_NODE="4,3"), "adds up to 7 tasks"),
    (srun_env(3, 2, 4, SLURM_PROCID="8"), "rank 8 is outside the world of 8"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, "not started by srun"),
    (_without(torchrun_env(3, 1, 4), "MASTER_PORT"), "from torchrun is incomplete: MASTER_PORT unset"),
    (torchrun_env(3, 1, 4, LOCAL_RANK="5"), "local rank 5 is outside the 4 ranks on this node"),
    (deepspeed_env(7, 2, 4, CROSS_RANK="2"), "node rank 2 \\(CROSS_RANK\\) is outside 2 nodes"),
    (_without(deepspeed_env(1, 1, 2), "LOCAL_RANK"), "deepspeed launcher is incomplete: LOCAL_RANK unset"),
    ({"RANK": "0"}, "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT unset"),
])
def test_missing_or_inconsistent_variables_are_clear_errors(env, needle):
    with pytest.raises(ValueError, match=needle):
        resolve_launch(env)


@pytest.mark.parametrize("world, teacher, needle", [(128, 128, "at least one rank"), (128, 0, "at least one rank"),
                                                    (128, None, "needs transport.teacher_ranks")])
def test_rank_layout_validates_teacher_student_counts(world, teacher, needle):
    with pytest.raises(ValueError, match=needle):
        Roles.build("disaggregated", world, teacher)


def test_setup_env_exports_the_srun_rank(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "LOCAL_SIZE", "CROSS_RANK"):
        monkeypatch.delenv(var, raising=False)
    for key, value in srun_env(5, 2, 4, prefix="n").items():
        monkeypatch.setenv(key, value)
    distributed.setup_env("cpu")
    assert {v: os.environ[v] for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")} == \
        {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n001", "MASTER_PORT": "24242"}
    distributed.setup_env("cpu")  # a second call (RANK now set) agrees with srun
    monkeypatch.setenv("SLURM_PROCID", "6")
    with pytest.raises(ValueError, match="RANK=5 contradicts SLURM_PROCID=6"):
        distributed.setup_env("cpu")


HOSTLISTS = [("n1", ["n1"]), ("n[1-3]", ["n1", "n2", "n3"]),
             ("gpu[001-003,7],login", ["gpu001", "gpu002", "gpu003", "gpu7", "login"]),  # padding per range
             ("r[1-2]n[8-9]", ["r1n8", "r1n9", "r2n8", "r2n9"]), ("a[09-11]", ["a09", "a10", "a11"])]


@pytest.mark.parametrize("text, names", HOSTLISTS)
def test_hostlist_expansion(text, names):
    assert parse_hostlist(text) == names  # the parser used where Slurm's commands are not on PATH
    if shutil.which("scontrol") is None:
        assert expand_hostlist(text) == names


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed (Slurm tier not set up here)")
def test_hostlist_expansion_matches_scontrol():
    for text, _ in HOSTLISTS:
        out = subprocess.run(["scontrol", "show", "hostnames", text], capture_output=True, text=True, timeout=30)
        assert out.stdout.split() == parse_hostlist(text) == expand_hostlist(text), text


def test_tasks_per_node_and_malformed_lists():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1] and expand_tasks_per_node("") == []
    for bad in ("n[1-", "n[a-b]", "n1,,n2"):
        with pytest.raises(ValueError, match="malformed"):
            parse_hostlist(bad)
    with pytest.raises(ValueError, match="SLURM_STEP_TASKS_PER_NODE"):
        expand_tasks_per_node("2(y3)")
