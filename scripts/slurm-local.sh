#!/usr/bin/env bash
# A one-host SLURM cluster (slurmctld + slurmd + munged on this machine) whose
# whole state lives in one directory: slurm.conf, the munge key and socket,
# spool, state save, logs and pid files. Nothing under /etc is read or
# written (beyond what installing the packages did). For trying the templates
# in launch/slurm/ on one machine and for the CI test (tests/it/slurm.rs).
#
#   scripts/slurm-local.sh up DIR [--cpus N]   start the daemons, wait until the node is idle,
#                                              print the environment to use (eval "$(...)")
#   scripts/slurm-local.sh env DIR             print that environment again
#   scripts/slurm-local.sh logs DIR [LINES]    tail of the daemons' logs
#   scripts/slurm-local.sh down DIR            cancel every job, stop the daemons (DIR is kept)
#
# Needs root (slurmd runs jobs as their user) and Debian's packages:
#   apt-get install slurm-wlm munge          (SLURM 22.05 on Debian 12)
# Works without systemd (a container): the daemons are started directly.
# Example:
#   eval "$(scripts/slurm-local.sh up /tmp/slurm)"    # exports SLURM_CONF
#   sbatch --ntasks=2 launch/slurm/cpu.sbatch configs/tiny.toml
#   scripts/slurm-local.sh down /tmp/slurm
set -euo pipefail
# The daemons live in sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

say() { printf '[slurm-local] %s\n' "$*" >&2; }
die() { printf '[slurm-local] error: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '8,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[ $# -ge 2 ] || usage
CMD=$1
DIR=$2
shift 2
case "$DIR" in
  *[[:space:]]*) die "DIR must not contain white space: '$DIR'" ;;
esac
if [ "$CMD" = up ]; then
  mkdir -p "$DIR" 2>/dev/null || die "cannot create $DIR"
fi
[ -d "$DIR" ] || die "no such directory: $DIR"
DIR=$(cd "$DIR" && pwd -P)

CONF=$DIR/etc/slurm.conf
MUNGE_SOCKET=$DIR/munge/munge.socket.2
NODE=$(hostname -s)

pid_alive() { # pidfile
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

print_env() {
  echo "export SLURM_CONF=$CONF"
}

log_tails() {
  local n=${1:-20} f
  for f in "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" "$DIR/munge/munged.log"; do
    if [ -f "$f" ]; then
      printf '%s\n' "--- last $n lines of $f" >&2
      tail -n "$n" "$f" >&2
    fi
  done
}

fail_up() {
  say "error: $*"
  log_tails 30
  say "stopping what was started ($0 down $DIR)"
  stop_daemons
  exit 1
}

port_busy() { # port: something accepts connections on it
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

pick_ports() {
  # 10000-19999: clear of sigma's per-job rendezvous ports (20000 + job id %
  # 9500) and of Linux's ephemeral ports (32768 and up).
  local base i
  for i in $(seq 1 50); do
    base=$((10000 + RANDOM % 9999))
    if ! port_busy "$base" && ! port_busy $((base + 1)); then
      CTLD_PORT=$base
      SLURMD_PORT=$((base + 1))
      return 0
    fi
  done
  return 1
}

write_conf() {
  local cpus=$1 mem_mb
  mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
  cat >"$CONF" <<EOF
# Written by scripts/slurm-local.sh: a one-host cluster with all state under $DIR.
ClusterName=sigma-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups, no systemd: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
MpiDefault=none
SwitchType=switch/none
PropagateResourceLimits=NONE
SchedulerType=sched/backfill
# Schedule every 2 s (not 30-60 s): a requeued job starts soon after its cred_expire wait.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=30
MessageTimeout=10
KillWait=10
InactiveLimit=0
MinJobAge=600
JobRequeue=1
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munged() {
  mkdir -p "$DIR/munge"
  # munged wants every directory above its socket to be searchable by all.
  chmod 0755 "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    if command -v mungekey >/dev/null 2>&1; then
      mungekey --create --keyfile="$DIR/munge/munge.key" || die "mungekey failed"
    else
      dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
    fi
    chmod 0400 "$DIR/munge/munge.key"
  fi
  # --force: run although directories above DIR (a 0700 temp dir) are not
  # searchable by everyone; every client of this socket is root anyway.
  munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" \
    --log-file="$DIR/munge/munged.log" --pid-file="$DIR/munge/munged.pid" \
    --seed-file="$DIR/munge/munged.seed" ||
    fail_up "munged did not start"
  local i
  for i in $(seq 1 50); do
    munge -S "$MUNGE_SOCKET" -n </dev/null 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  fail_up "munged does not answer on $MUNGE_SOCKET"
}

node_state() {
  SLURM_CONF=$CONF sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1
}

daemon_gone() { # pidfile tries: its process died, or it wrote no pid file in 10 s
  if [ -s "$1" ]; then
    ! kill -0 "$(cat "$1")" 2>/dev/null
  else
    [ "$2" -gt 20 ]
  fi
}

wait_idle() {
  local i st=""
  for i in $(seq 1 120); do
    st=$(node_state || true)
    case "$st" in
      idle) return 0 ;;
      *drain* | *down* | *inval* | *fail*)
        # Give a fresh registration a few seconds before calling it a failure.
        [ "$i" -gt 20 ] && fail_up "node $NODE is '$st': $(SLURM_CONF=$CONF scontrol show node "$NODE" 2>/dev/null | grep -o 'Reason=.*' || true)"
        ;;
    esac
    daemon_gone "$DIR/run/slurmctld.pid" "$i" && fail_up "slurmctld exited"
    daemon_gone "$DIR/run/slurmd.pid" "$i" && fail_up "slurmd exited"
    sleep 0.5
  done
  fail_up "node $NODE not idle after 60 s (state '${st:-unknown}')"
}

stop_pidfile() { # name pidfile
  local pid i
  [ -s "$2" ] || return 0
  pid=$(cat "$2")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "$1 (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$2"
}

stepd_pids() { # this cluster's slurmstepd processes (they log to its slurmd.log) and their descendants
  local p ppid roots="" all changed
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    case "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" in slurmstepd*) ;; *) continue ;; esac
    if ls -l "/proc/$p/fd" 2>/dev/null | grep -qF -- "-> $DIR/log/slurmd.log"; then
      roots="$roots $p"
    fi
  done
  [ -n "$roots" ] || return 0
  all=$roots
  changed=1
  while [ -n "$changed" ]; do
    changed=""
    for p in /proc/[0-9]*; do
      p=${p#/proc/}
      case " $all " in *" $p "*) continue ;; esac
      ppid=$(awk '{ print $4 }' "/proc/$p/stat" 2>/dev/null) || continue
      case " $all " in *" $ppid "*) all="$all $p"; changed=1 ;; esac
    done
  done
  echo $all
}

stop_daemons() {
  local left
  stop_pidfile slurmd "$DIR/run/slurmd.pid"
  stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
  # Steps whose slurmd is gone (or that outlived it) and their tasks.
  left=$(stepd_pids)
  if [ -n "$left" ]; then
    say "killing leftover job processes: $left"
    kill -KILL $left 2>/dev/null || true
  fi
  if pid_alive "$DIR/munge/munged.pid"; then
    munged --stop --socket="$MUNGE_SOCKET" >/dev/null 2>&1 || true
    stop_pidfile munged "$DIR/munge/munged.pid"
  fi
  rm -f "$DIR/munge/munged.pid"
}

cmd_up() {
  local cpus=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --cpus) cpus=${2:?--cpus needs a number}; shift 2 ;;
      --cpus=*) cpus=${1#--cpus=}; shift ;;
      *) die "unknown option for up: $1" ;;
    esac
  done
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd starts jobs as their user)"
  local b missing=""
  for b in munged munge unmunge slurmctld slurmd sinfo scontrol squeue scancel; do
    command -v "$b" >/dev/null 2>&1 || missing="$missing $b"
  done
  [ -z "$missing" ] || die "missing:$missing (install with: apt-get install slurm-wlm munge)"
  if pid_alive "$DIR/run/slurmctld.pid" || pid_alive "$DIR/run/slurmd.pid" || pid_alive "$DIR/munge/munged.pid"; then
    die "a cluster from $DIR is already running ($0 down $DIR first)"
  fi
  [ -n "$cpus" ] || cpus=$(nproc)
  mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool/slurmd" "$DIR/run" "$DIR/log"
  pick_ports || die "no free pair of ports for slurmctld and slurmd"
  write_conf "$cpus"
  start_munged
  # -c: a cold start, no jobs or nodes remembered from an earlier run of this DIR.
  slurmctld -c -f "$CONF" || fail_up "slurmctld did not start"
  slurmd -f "$CONF" -N "$NODE" || fail_up "slurmd did not start"
  wait_idle
  say "node $NODE idle ($cpus CPUs), slurmctld on port $CTLD_PORT; logs in $DIR/log"
  print_env
}

cmd_down() {
  local ids i
  if pid_alive "$DIR/run/slurmctld.pid"; then
    ids=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
    if [ -n "$ids" ]; then
      say "cancelling jobs: $(echo $ids)"
      SLURM_CONF=$CONF scancel $ids 2>/dev/null || true
      for i in $(seq 1 50); do
        [ -z "$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)" ] && break
        sleep 0.2
      done
    fi
  fi
  stop_daemons
  say "stopped (state and logs kept in $DIR)"
}

case "$CMD" in
  up) cmd_up "$@" ;;
  down) cmd_down ;;
  env) print_env ;;
  logs) log_tails "${1:-40}" ;;
  *) usage ;;
esac
