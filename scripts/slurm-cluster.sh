#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying the SLURM profile and
# for the tests: slurmctld and slurmd configured, logging and keeping state
# in one folder, on free ports, no accounting.
#
#   scripts/slurm-cluster.sh start DIR    then: export SLURM_CONF=DIR/slurm.conf
#   scripts/slurm-cluster.sh stop DIR     stops the daemons started in DIR
#
# Needs root and Debian's slurm-wlm and munge packages (make test-infra).
# Jobs go to partition "debug"; processes are tracked without cgroups
# (proctrack/linuxproc, task/none), so it also runs inside a container.
# Outside DIR it uses MUNGE's default socket (/run/munge; a running munged is
# reused, else one is started with a key in DIR) and /run/slurm/conf, where
# slurmd publishes the configuration for commands inside jobs.
set -euo pipefail

usage() { echo "usage: scripts/slurm-cluster.sh start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(realpath -m "$2")

stop() {
  # slurmd first, then the controller, then MUNGE, each by the pid it wrote
  for daemon in slurmd slurmctld munged; do
    pidfile="$dir/$daemon.pid"
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
  # the configuration slurmd published for commands in jobs
  if [ "$(readlink /run/slurm/conf 2>/dev/null)" = "$dir/spool/conf-cache" ]; then
    rm -f /run/slurm/conf
  fi
}

start() {
  mkdir -p "$dir"/{state,spool}
  chmod 700 "$dir"
  host=$(hostname -s)
  read -r ctld_port slurmd_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
  cpus=$(nproc)
  memory_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 1024 ))

  # MUNGE on its default socket: slurmd fetching its configuration uses that one.
  if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge.key"
    mkdir -p /run/munge
    munged --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
           --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" --force
  fi

  cat > "$dir/slurm.conf" <<CONF
ClusterName=privbench-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# keep finished jobs visible to squeue for a while (status checks without accounting)
MinJobAge=600
# slurmd fetches this file from the controller and publishes it at
# /run/slurm/conf, where commands inside jobs find it: Snakemake's job step
# drops SLURM_CONF from their environment.
SlurmctldParameters=enable_configless
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld
  slurmd --conf-server "127.0.0.1:$ctld_port"
  for _ in $(seq 60); do
    state=$(sinfo -h -o %T 2>/dev/null || true)
    if [ "$state" = idle ]; then
      echo "slurm-cluster.sh: node $host idle; export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "slurm-cluster.sh: the node did not come up (state '${state:-none}'); logs in $dir" >&2
  stop
  return 1
}

case "$action" in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
