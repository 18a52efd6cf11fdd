#!/usr/bin/env bash
# Keeps a command running: restarts it when it fails, stops it (and all it
# started) when told to.
#
# usage: launch/supervise.sh [--max-restarts N] [--backoff S] [--name NAME] [--grace S]
#                            -- CMD [ARGS...]
#
#   --max-restarts N  give up after N restarts and exit with CMD's last
#                     status (default: -1, no limit)
#   --backoff S       seconds before the first restart (default 1); doubles on
#                     each failure up to 10 s, back to S after a run of 60 s
#   --name NAME       how the log lines name CMD (default: CMD's first word)
#   --grace S         seconds from a stop signal to SIGKILL (default 15)
#
# CMD runs in its own process group (its own session). When it exits
# non-zero or is killed by a signal, a line with the status or signal and
# the time goes to stderr and CMD starts again after the backoff. Exit 0 from
# CMD ends the supervisor with 0. SIGTERM, SIGINT or SIGHUP to the
# supervisor go to CMD's whole process group; the supervisor then waits for
# it (SIGKILL to the group after --grace) and exits with CMD's status. Whatever
# is left in the group when CMD itself ends is killed too, so nothing
# outlives the supervisor (except when the supervisor itself gets SIGKILL).
#
# Example: launch/supervise.sh --name replica0 -- mpirun -np 2 build/launch/xq worker --serve
set -u

max_restarts=-1
backoff=1
name=""
grace=15  # seconds between forwarding a stop signal and SIGKILL
usage() {
  sed -n '5,13p' "$0" | sed 's/^# \{0,1\}//'
  exit "$1"
}
while [ $# -gt 0 ]; do
  case "$1" in
    --max-restarts) [ $# -ge 2 ] || usage 2 >&2; max_restarts=$2; shift 2 ;;
    --backoff) [ $# -ge 2 ] || usage 2 >&2; backoff=$2; shift 2 ;;
    --name) [ $# -ge 2 ] || usage 2 >&2; name=$2; shift 2 ;;
    --grace) [ $# -ge 2 ] || usage 2 >&2; grace=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage 0 ;;
    *) echo "supervise: unknown option '$1' (the command goes after --)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "supervise: no command given (after --)" >&2; exit 2; }
[[ "$max_restarts" =~ ^-?[0-9]+$ ]] || { echo "supervise: --max-restarts wants an integer" >&2; exit 2; }
[[ "$backoff" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "supervise: --backoff wants seconds" >&2; exit 2; }
[[ "$grace" =~ ^[0-9]+$ ]] || { echo "supervise: --grace wants whole seconds" >&2; exit 2; }
[ -n "$name" ] || name=$(basename -- "$1")
max_backoff=10
reset_after=60

log() { echo "[supervise $name] $(date '+%Y-%m-%d %H:%M:%S') $*" >&2; }

child=0          # CMD's pid, which is also its process group id
stopping=""      # the signal that asked us to stop
stop_deadline=0

on_signal() {
  local signal=$1
  if [ -z "$stopping" ]; then
    stopping=$signal
    stop_deadline=$((SECONDS + grace))
    if [ "$child" -gt 0 ]; then
      log "got SIG$signal: passing it to process group $child"
      kill -s "$signal" -- "-$child" 2>/dev/null
    fi
  fi
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

# True while the process exists and is not a zombie.
running() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ "$state" != Z* ]]
}

group_alive() { kill -0 -- "-$1" 2>/dev/null; }

# Waits for CMD, with the SIGKILL deadline once stopping; sets child_status.
wait_child() {
  while running "$child"; do
    if [ -n "$stopping" ]; then
      if [ "$SECONDS" -ge "$stop_deadline" ]; then
        log "process group $child still running ${grace} s after SIG$stopping: SIGKILL"
        kill -KILL -- "-$child" 2>/dev/null
        stop_deadline=$((SECONDS + 3600))
      fi
      sleep 0.1
    else
      # Returns early when a trapped signal comes; the loop looks again.
      wait "$child"
    fi
  done
  # Reaps the zombie, or gives the status bash kept when `wait` reaped it.
  wait "$child"
  child_status=$?
}

# What CMD left in its process group (e.g. ranks of a crashed mpirun): TERM,
# then KILL after a few seconds.
clean_group() {
  local pgid=$1 waited=0
  group_alive "$pgid" || return 0
  log "processes of group $pgid outlived it: SIGTERM"
  kill -TERM -- "-$pgid" 2>/dev/null
  while group_alive "$pgid" && [ "$waited" -lt 50 ]; do
    sleep 0.1
    waited=$((waited + 1))
  done
  if group_alive "$pgid"; then
    log "group $pgid still there: SIGKILL"
    kill -KILL -- "-$pgid" 2>/dev/null
  fi
}

describe() {
  local status=$1
  if [ "$status" -gt 128 ] && signal_name=$(kill -l "$((status - 128))" 2>/dev/null); then
    echo "was killed by SIG$signal_name (status $status)"
  else
    echo "exited with status $status"
  fi
}

restarts=0
delay=$backoff
while true; do
  started=$SECONDS
  # setsid: a new session and process group, so that signals reach CMD's
  # whole tree and a terminal's Ctrl-C reaches only the supervisor. env
  # restores SIGINT/SIGQUIT, which bash ignores in background commands.
  setsid env --default-signal=INT,QUIT -- "$@" &
  child=$!
  log "started (pid $child, process group $child): $*"
  # A stop signal that came while CMD was starting.
  [ -n "$stopping" ] && kill -s "$stopping" -- "-$child" 2>/dev/null
  wait_child
  status=$child_status
  uptime=$((SECONDS - started))
  clean_group "$child"
  pgid=$child
  child=0
  if [ -n "$stopping" ]; then
    log "stopped after SIG$stopping: $(describe "$status")"
    exit "$status"
  fi
  if [ "$status" -eq 0 ]; then
    log "exited with status 0 after ${uptime} s: done"
    exit 0
  fi
  if [ "$max_restarts" -ge 0 ] && [ "$restarts" -ge "$max_restarts" ]; then
    log "$(describe "$status") after ${uptime} s; no restarts left (--max-restarts $max_restarts)"
    exit "$status"
  fi
  [ "$uptime" -ge "$reset_after" ] && delay=$backoff
  restarts=$((restarts + 1))
  log "$(describe "$status") after ${uptime} s (process group $pgid); restart $restarts in ${delay} s"
  sleep "$delay" &
  sleeper=$!
  wait "$sleeper" 2>/dev/null
  kill "$sleeper" 2>/dev/null
  wait "$sleeper" 2>/dev/null
  if [ -n "$stopping" ]; then
    log "got SIG$stopping while waiting to restart: not restarting"
    exit "$status"
  fi
  delay=$(awk -v d="$delay" -v m="$max_backoff" 'BEGIN { d *= 2; if (d > m) d = m; print d }')
done
