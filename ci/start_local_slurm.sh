#!/usr/bin/env bash
# A throwaway Slurm cluster on this machine, for the sbatch template tests (tests/test_slurm.py) and CI:
# one slurmctld and N slurmd "virtual nodes" (n1..nN) on loopback, Debian's Slurm + munge, no systemd.
#
#   bash ci/start_local_slurm.sh          start (installs the packages with apt if needed; no-op when up)
#   bash ci/start_local_slurm.sh stop     stop the daemons this script started (by their PID files)
#   bash ci/start_local_slurm.sh status   exit 0 when every node is up
#   bash ci/start_local_slurm.sh check    exit 0 when this machine can host the cluster, else 3 + the reason
# Exit codes of start: 0 up, 3 cannot host here (not root / no apt-get), 4 apt-get failed, 1 daemons did not come up.
#
# Why 2+ virtual nodes: Slurm 22.05's backfill reserves whole nodes, so a heterogeneous job never starts on a
# one-node cluster; with n1, n2 its components land on different "nodes" (../shared/notes/slurm-local.md).
# Knobs: SLURM_CI_DIR (/tmp/semalign-slurm), SLURM_CI_NODES (2), SLURM_CI_AUTH (munge|none), SLURM_CI_MEM_MB (4096).
# Outside SLURM_CI_DIR it changes: apt packages (slurmctld slurmd slurm-client munge), /etc/slurm/slurm.conf,
# and "127.0.0.1 nX" lines in /etc/hosts for names that do not resolve yet.
set -euo pipefail

DIR=${SLURM_CI_DIR:-/tmp/semalign-slurm}
NNODES=${SLURM_CI_NODES:-2}
AUTH=${SLURM_CI_AUTH:-munge}
MEM_MB=${SLURM_CI_MEM_MB:-4096}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)
NODES=$(seq -f 'n%g' 1 "$NNODES")
FIRST_PORT=17001

say() { echo "[local-slurm] $*" >&2; }

# ---- can this machine host it? ---------------------------------------------------------------------------
cannot_host() {  # prints the reason and returns 0 when it cannot
    if [ "$(id -u)" != 0 ]; then echo "needs root (installs packages, writes /etc/slurm, starts daemons)"; return 0; fi
    if ! have_slurm && ! command -v apt-get >/dev/null; then
        echo "Slurm is not installed and there is no apt-get to install it"; return 0
    fi
    return 1
}

have_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
        { [ "$AUTH" != munge ] || command -v munged >/dev/null; }
}

# ---- daemons by PID file -----------------------------------------------------------------------------------
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {
    local f=$1 pid i
    [ -s "$f" ] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        say "stopping $(basename "$f" .pid) (pid $pid)"
        kill "$pid"
        for i in $(seq 1 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then say "pid $pid ignored SIGTERM; SIGKILL"; kill -9 "$pid"; fi
    fi
    rm -f "$f"
}

stop_all() {
    local f
    for f in "$DIR"/run/slurmd-*.pid; do stop_pidfile "$f"; done
    stop_pidfile "$DIR/run/slurmctld.pid"
    stop_pidfile "$DIR/run/munged.pid"   # only present when this script started munged
}

is_up() {
    local n
    alive "$DIR/run/slurmctld.pid" || return 1
    for n in $NODES; do alive "$DIR/run/slurmd-$n.pid" || return 1; done
    [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -cE '^(idle|mixed|allocated)$')" = "$NNODES" ]
}

# ---- setup steps -------------------------------------------------------------------------------------------
install_packages() {
    have_slurm && return 0
    local t0=$SECONDS
    say "installing Slurm and munge with apt"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || say "apt-get update failed; trying the install with the lists at hand"
    if ! apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; then
        say "apt-get could not install slurmctld slurmd slurm-client munge"; exit 4
    fi
    say "installed in $((SECONDS - t0))s"   # the postinst 'policy-rc.d denied execution' lines are harmless
}

resolve_names() {  # the virtual nodes become MASTER_ADDR inside jobs, so they must resolve
    local name
    for name in "$HOST" $NODES; do
        getent hosts "$name" >/dev/null || echo "127.0.0.1 $name" >>/etc/hosts
    done
}

start_munge() {  # munged refuses to run as root (its seed dir belongs to munge): run it as munge
    [ "$AUTH" = munge ] || return 0
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --force 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0   # someone's munged already answers
    runuser -u munge -- /usr/sbin/munged
    local i
    for i in $(seq 1 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$DIR/run/munged.pid"
}

write_conf() {
    local auth=munge port=$FIRST_PORT n
    [ "$AUTH" = munge ] || auth=none
    mkdir -p /etc/slurm
    {
        cat <<EOF
# written by semalign_ds ci/start_local_slurm.sh: a throwaway test cluster, not for production
ClusterName=semalign-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/$auth
CredType=cred/$auth
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# het jobs start only on a backfill pass (default every 30 s)
SchedulerParameters=bf_interval=1
ReturnToService=2
KillWait=5
MinJobAge=600
DefMemPerCPU=256
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
        for n in $NODES; do
            echo "NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$port CPUs=$(nproc) RealMemory=$MEM_MB State=UNKNOWN"
            port=$((port + 1))
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
    } >"$CONF"
}

start_daemons() {
    local n i ready=0 t0=$SECONDS
    slurmctld
    for n in $NODES; do slurmd -N "$n"; done
    for i in $(seq 1 150); do
        ready=$(sinfo -h -N -o '%T' 2>/dev/null | grep -c '^idle$' || true)
        [ "$ready" = "$NNODES" ] && break
        sleep 0.2
    done
    if [ "$ready" != "$NNODES" ]; then
        say "only $ready of $NNODES nodes came up; logs in $DIR/log:"
        sinfo -N >&2 || true
        tail -n 20 "$DIR"/log/*.log >&2 || true
        return 1
    fi
    say "up in $((SECONDS - t0))s: $NNODES nodes x $(nproc) CPUs, partition debug (auth=$AUTH)"
}

start() {
    local why
    if why=$(cannot_host); then say "cannot host a Slurm cluster here: $why"; exit 3; fi
    if is_up; then say "already up"; return 0; fi
    stop_all   # leftovers of a half-started earlier run (our PIDs only)
    install_packages
    mkdir -p "$DIR/run" "$DIR/log" "$DIR/state"
    rm -rf "${DIR:?}/state/"* "$DIR/spool"
    for n in $NODES; do mkdir -p "$DIR/spool/$n"; done
    resolve_names
    start_munge
    write_conf
    start_daemons
}

case "${1:-start}" in
    start) start ;;
    stop) stop_all ;;
    status) if is_up; then sinfo -N; else echo "local Slurm is not running"; exit 1; fi ;;
    check) if why=$(cannot_host); then echo "$why"; exit 3; fi ;;
    *) echo "usage: $0 [start|stop|status|check]" >&2; exit 2 ;;
esac
