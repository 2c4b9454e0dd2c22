#!/usr/bin/env bash
# A real single-node Slurm cluster on 127.0.0.1, for tests and for trying the sbatch script.
#
#   clusters/slurm/local-cluster.sh up       start munged (if not running), slurmctld and slurmd
#   clusters/slurm/local-cluster.sh status   daemons and node state
#   clusters/slurm/local-cluster.sh down     cancel jobs, stop what `up` started
#
# Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge
# (`bash .ci/install --test` installs them). Everything it writes lives in CTM_SLURM_DIR
# (default /tmp/ctm-dist-slurm): config, state, spool, logs. Clients find the cluster with
#   export SLURM_CONF=$CTM_SLURM_DIR/slurm.conf
# which `up` prints. Exit status 3 means "cannot run here" (not root, packages missing).
set -euo pipefail

dir="${CTM_SLURM_DIR:-/tmp/ctm-dist-slurm}"
ctld_port="${CTM_SLURMCTLD_PORT:-6817}"
slurmd_port="${CTM_SLURMD_PORT:-6818}"
cpus="${CTM_SLURM_CPUS:-$(nproc)}"
conf="$dir/slurm.conf"
export SLURM_CONF="$conf"

die() { echo "local-cluster: $*" >&2; exit 1; }
cannot_run() { echo "local-cluster: cannot run here: $*" >&2; exit 3; }

preflight() {
  [ "$(id -u)" = 0 ] || cannot_run "needs root (slurmd starts jobs as other users)"
  local cmd
  for cmd in slurmctld slurmd sinfo scontrol munged munge unmunge runuser; do
    command -v "$cmd" >/dev/null \
      || cannot_run "'$cmd' not found; install slurmctld slurmd slurm-client munge (bash .ci/install --test)"
  done
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_works; then return; fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- munged --force
  touch "$dir/munged.ours"
  local _
  for _ in $(seq 50); do munge_works && return; sleep 0.1; done
  die "munged did not start (see /var/log/munge/munged.log)"
}

write_config() {
  local mem_kb real_mb
  mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
  real_mb=$(( mem_kb * 8 / 10 / 1024 ))   # stay below MemTotal or slurmd drains the node
  cat >"$conf" <<EOF
# Written by clusters/slurm/local-cluster.sh
ClusterName=ctm-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
KillWait=10
InactiveLimit=0
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -n1; }

up() {
  preflight
  if pid_alive "$dir/slurmctld.pid" || pid_alive "$dir/slurmd.pid"; then
    die "already up (SLURM_CONF=$conf); run '$0 down' first"
  fi
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  chmod 0755 "$dir"
  start_munge
  write_config
  slurmctld -c -f "$conf"
  slurmd -c -f "$conf" -N localhost
  local _ state=""
  for _ in $(seq 150); do
    state=$(node_state)
    case "$state" in
      idle*|mix*|alloc*) echo "local-cluster: up, node $state; export SLURM_CONF=$conf"; return ;;
      down*|drain*) scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  die "node did not become idle (state '$state')"
}

stop_pidfile() {  # stop_pidfile FILE NAME: SIGTERM, then wait up to 10 s, then SIGKILL
  local f="$1" name="$2" pid _
  pid_alive "$f" || { rm -f "$f"; return 0; }
  pid=$(cat "$f")
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }; sleep 0.1; done
  echo "local-cluster: $name did not stop, killing it" >&2
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

down() {
  preflight
  if pid_alive "$dir/slurmctld.pid"; then
    scancel --full --quiet --partition=debug 2>/dev/null || true
    local _
    for _ in $(seq 50); do [ -z "$(squeue -h -t RUNNING,COMPLETING 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  stop_pidfile "$dir/slurmd.pid" slurmd
  stop_pidfile "$dir/slurmctld.pid" slurmctld
  if [ -e "$dir/munged.ours" ]; then
    munged --stop >/dev/null 2>&1 || true
    rm -f "$dir/munged.ours"
  fi
  echo "local-cluster: down"
}

status() {
  preflight
  local rc=0 name
  for name in slurmctld slurmd; do
    if pid_alive "$dir/$name.pid"; then
      echo "$name: running (pid $(cat "$dir/$name.pid"))"
    else
      echo "$name: stopped"; rc=1
    fi
  done
  if munge_works; then echo "munged: running"; else echo "munged: not answering"; rc=1; fi
  [ "$rc" = 0 ] && sinfo
  return "$rc"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 {up|down|status}" >&2; exit 2 ;;
esac
