#!/usr/bin/env bash
# A SLURM cluster of one or more compute nodes on this machine, for trying
# the SLURM profile and for the tests: slurmctld and one slurmd per node,
# logging and keeping state in one folder, on free ports, no accounting.
#
#   scripts/slurm-cluster.sh start DIR [NODES]   then: export SLURM_CONF=DIR/slurm.conf
#   scripts/slurm-cluster.sh kill-node DIR NODE  power a node off: SIGKILL to its slurmd
#                                                and to every process of its jobs
#   scripts/slurm-cluster.sh stop DIR            cancels the jobs, stops every daemon
#
# Nodes are n1..nNODES (default 1), each a slurmd of its own (slurmd -N nX)
# with its own port, spool folder, pid and log file, all on this host: Debian's
# SLURM runs several slurmd on one machine. Each node offers all the machine's
# cores and memory (they are shared, so jobs on several nodes compete for them).
# SLURMD_TIMEOUT (seconds, default 300) is how long a silent node stays up
# before the controller sets it DOWN and fails its jobs (NODE_FAIL).
#
# Needs root and Debian's slurm-wlm and munge packages (make test-infra).
# Jobs go to partition "debug"; processes are tracked without cgroups
# (proctrack/linuxproc, task/none), so it also runs inside a container.
# Outside DIR it uses MUNGE's default socket (/run/munge; a running munged is
# reused, else one is started with a key in DIR) and /run/slurm/conf, where
# slurmd publishes the configuration for commands inside jobs.
set -euo pipefail

usage() { echo "usage: scripts/slurm-cluster.sh start DIR [NODES] | kill-node DIR NODE | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1
dir=$(realpath -m "$2")
export SLURM_CONF="$dir/slurm.conf"

# The given pids and all their descendants (a job's step daemon, its shell, the workers).
with_descendants() {
  python3 - "$@" <<'PY'
import os, sys
children = {}
for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{entry}/stat") as handle:
            ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        continue
    children.setdefault(ppid, []).append(int(entry))
todo, seen = [int(p) for p in sys.argv[1:]], set()
while todo:
    pid = todo.pop()
    if pid not in seen:
        seen.add(pid)
        todo += children.get(pid, [])
print(*sorted(seen))
PY
}

# slurmstepd processes of this cluster's nodes (of one node if given): they
# keep their node's log file open (their environment and title are Slurm's own).
step_daemons() {
  local pid log="$dir/slurmd-${1:-*}.log"
  for pid in $(pgrep -x slurmstepd || true); do
    # shellcheck disable=SC2053  # $log is a pattern
    for fd in /proc/"$pid"/fd/*; do
      [[ "$(readlink "$fd" 2>/dev/null)" == $log ]] && { echo "$pid"; break; }
    done
  done
}

stop_pidfile() {
  local pidfile=$1 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

stop() {
  # jobs first (while the controller can still cancel them), then every slurmd,
  # the controller and MUNGE, each by the pid it wrote
  if [ -s "$dir/slurmctld.pid" ]; then
    scancel --full $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
  fi
  for pidfile in "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
    stop_pidfile "$pidfile"
  done
  # what a killed node or a cancel left behind
  local left
  left=$(step_daemons)
  [ -z "$left" ] || kill -9 $(with_descendants $left) 2>/dev/null || true
  # the configuration slurmd published for commands in jobs
  if [[ "$(readlink /run/slurm/conf 2>/dev/null)" == "$dir/spool/"* ]]; then
    rm -f /run/slurm/conf
  fi
}

kill_node() {
  local node=$1 pidfile="$dir/slurmd-$1.pid" jobs victims
  [ -s "$pidfile" ] || { echo "slurm-cluster.sh: no node $node running in $dir" >&2; exit 1; }
  jobs=$(squeue -h -w "$node" -o %i | tr '\n' ' ')
  victims=$(with_descendants "$(cat "$pidfile")" $(step_daemons "$node"))
  kill -9 $victims 2>/dev/null || true
  rm -f "$pidfile"
  echo "slurm-cluster.sh: killed node $node (jobs: ${jobs:-none}; pids: $victims)"
}

start() {
  local nodes=${1:-1}
  mkdir -p "$dir"/state
  chmod 700 "$dir"
  host=$(hostname -s)
  # one port for the controller, one per node
  read -r ctld_port node_ports < <(python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(1 + int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))' "$nodes")
  read -r -a node_ports <<< "$node_ports"
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

  cat > "$SLURM_CONF" <<CONF
ClusterName=privbench-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
# one spool folder, pid and log file per node (%n: the node's name)
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
SlurmdTimeout=${SLURMD_TIMEOUT:-300}
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
CONF
  for i in $(seq "$nodes"); do
    echo "NodeName=n$i NodeHostname=$host NodeAddr=127.0.0.1 Port=${node_ports[$((i - 1))]}" \
         "CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN" >> "$SLURM_CONF"
  done
  echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$SLURM_CONF"

  slurmctld
  for i in $(seq "$nodes"); do
    mkdir -p "$dir/spool/n$i"
    slurmd -N "n$i" --conf-server "127.0.0.1:$ctld_port"
  done
  for _ in $(seq 60); do
    idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
    if [ "$idle" -eq "$nodes" ]; then
      echo "slurm-cluster.sh: $nodes node(s) idle; export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "slurm-cluster.sh: the nodes did not come up ($(sinfo -h -N -o '%N %T' 2>/dev/null | tr '\n' ' ')); logs in $dir" >&2
  stop
  return 1
}

case "$action" in
  start) [ $# -le 3 ] || usage; start "${3:-1}" ;;
  kill-node) [ $# -eq 3 ] || usage; kill_node "$3" ;;
  stop) [ $# -eq 2 ] || usage; stop ;;
  *) usage ;;
esac
