#!/usr/bin/env bash
# Start a single-node Slurm cluster (with accounting) on this machine, as root.
#
# Idempotent: when the cluster already answers (`sinfo` shows our node up, the
# controller answers `scontrol ping`, `sacct` works) it does nothing.
#
# Why slurmdbd + MariaDB: submitit (and Hydra's submitit launcher) read job
# states with `sacct`; without accounting sacct fails and every job reads as
# UNKNOWN, so a failed or cancelled job is never noticed. matrix_hpc's own
# cluster code reads live states from `squeue`/`scontrol` and only falls back
# to sacct, but the submitit paths need accounting to be accurate.
#
# The node declares more CPUs than the machine has (SlurmdParameters=
# config_overrides) so a Ray head, a worker and a driver job fit side by side
# on a 2-core box. Override with SLURM_NODE_CPUS / SLURM_NODE_MEM_MB.
set -euo pipefail

NODE_CPUS="${SLURM_NODE_CPUS:-8}"
NODE_MEM_MB="${SLURM_NODE_MEM_MB:-16000}"
PARTITION="${SLURM_PARTITION:-debug}"
CLUSTER_NAME="${SLURM_CLUSTER_NAME:-matrix}"
NODE="$(hostname -s)"
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm

log() { echo "[setup_slurm] $*"; }

cluster_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state="$(timeout 10 sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -1)" || return 1
    [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]] || return 1
    # No srun here: on a busy cluster it would wait for resources.
    timeout 10 scontrol ping 2>/dev/null | grep -q UP || return 1
    timeout 10 sacct -n -X -j 1 >/dev/null 2>&1
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null \
        && command -v munged >/dev/null && command -v mariadbd >/dev/null; then
        return
    fi
    log "installing slurm-wlm, slurmdbd, munge, mariadb-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        slurm-wlm slurmdbd munge mariadb-server >/dev/null
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    log "starting munged"
    [[ -s /etc/munge/munge.key ]] || {
        dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    }
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.1; done
    log "munged did not start; see /var/log/munge/munged.log"; exit 1
}

start_mariadb() {
    if mariadb -e 'select 1' >/dev/null 2>&1; then return; fi
    log "starting mariadb"
    install -d -o mysql -g mysql /run/mysqld
    /etc/init.d/mariadb start >/dev/null
    for _ in $(seq 100); do mariadb -e 'select 1' >/dev/null 2>&1 && return; sleep 0.2; done
    log "mariadb did not start; see /var/log/mysql/error.log"; exit 1
}

create_accounting_db() {
    mariadb <<'SQL'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
}

write_configs() {
    install -d "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /var/lib/slurm
    cat >"$CONF_DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LOG_DIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$CONF_DIR/slurmdbd.conf"
    cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by .ci/setup_slurm.sh: single-node test cluster.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# A job that asks for no memory gets this much per CPU, not the whole node.
DefMemPerCPU=1000
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
JobRequeue=1
PreemptType=preempt/none
ReturnToService=2
KillWait=10
MinJobAge=600
SchedulerType=sched/backfill
MpiDefault=none
NodeName=$NODE CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_slurm_daemons() {
    if ! pgrep -x slurmdbd >/dev/null; then
        log "starting slurmdbd"
        /usr/sbin/slurmdbd
        for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
    fi
    sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER_NAME" \
        || sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
    if ! pgrep -x slurmctld >/dev/null; then
        log "starting slurmctld"
        /usr/sbin/slurmctld
    fi
    if ! pgrep -x slurmd >/dev/null; then
        log "starting slurmd"
        /usr/sbin/slurmd
    fi
}

wait_for_node() {
    for _ in $(seq 60); do
        local state
        state="$(sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -1 || true)"
        case "$state" in
            idle*|mix*|alloc*) return ;;
            down*|drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    log "node $NODE never became idle; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
    sinfo -N -l || true
    exit 1
}

ensure_hostname_resolves() {
    # slurmctld and slurmd find each other by this name.
    getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >>/etc/hosts
}

main() {
    if [[ $EUID -ne 0 ]]; then echo "run as root" >&2; exit 1; fi
    if cluster_ready; then log "Slurm cluster already up"; return; fi
    ensure_hostname_resolves
    install_packages
    start_munge
    start_mariadb
    create_accounting_db
    # Configs are rewritten only when no controller is running, so a live
    # cluster is never changed under its jobs.
    pgrep -x slurmctld >/dev/null || write_configs
    start_slurm_daemons
    wait_for_node
    timeout 120 srun -N1 -n1 -t 1 --mem=100M hostname
    sacct -n -X -j 1 >/dev/null
    log "Slurm cluster up: $(sinfo -h -o '%P %a %D %t %c cpus')"
}

main "$@"
