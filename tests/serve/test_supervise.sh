#!/usr/bin/env bash
# launch/supervise.sh: restarts a failing command, ends with its exit 0,
# passes SIGTERM/SIGINT to the command's whole process group, SIGKILLs a
# group that ignores them, and leaves no process behind in any case.
#
# usage: tests/serve/test_supervise.sh [path/to/supervise.sh]
set -u
here=$(cd "$(dirname "$0")" && pwd)
supervise=${1:-$here/../../launch/supervise.sh}
work=$(mktemp -d)
failures=0
started_pids=()
cleanup() {
  local pid
  for pid in "${started_pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  rm -rf "$work"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}

# Waits up to $2 seconds for file $1 to exist.
wait_for_file() {
  local i
  for ((i = 0; i < $2 * 20; i++)); do
    [ -s "$1" ] && return 0
    sleep 0.05
  done
  return 1
}

# Waits up to $2 seconds for process $1 (our child) to end; sets waited_status.
wait_for_exit() {
  local i
  for ((i = 0; i < $2 * 20; i++)); do
    if ! kill -0 "$1" 2>/dev/null || [[ $(ps -o stat= -p "$1") == Z* ]]; then
      wait "$1"
      waited_status=$?
      return 0
    fi
    sleep 0.05
  done
  return 1
}

group_gone() { ! kill -0 -- "-$1" 2>/dev/null; }

# --- 1. Fails twice (an exit status, then a signal), then exits 0.
count=$work/runs
"$supervise" --backoff 0.1 --name flaky -- bash -c '
  n=$(cat "$0" 2>/dev/null || echo 0); echo $((n + 1)) > "$0"
  case $n in 0) exit 3 ;; 1) kill -KILL $$ ;; *) exit 0 ;; esac' "$count" 2> "$work/log1"
status=$?
[ "$status" -eq 0 ] || fail "flaky: the supervisor exited $status, expected 0"
[ "$(cat "$count")" = 3 ] || fail "flaky: ran $(cat "$count") times, expected 3"
grep -q "exited with status 3 .*restart 1 in 0.1 s" "$work/log1" || fail "flaky: no log of the exit 3 and restart 1"
grep -q "killed by SIGKILL .*restart 2 in 0.2 s" "$work/log1" || fail "flaky: no log of the SIGKILL and restart 2 with a doubled backoff"
grep -q "restart 3" "$work/log1" && fail "flaky: restarted after exit 0"

# --- 2. --max-restarts: gives up with the command's status.
rm -f "$count"
"$supervise" --backoff 0.1 --max-restarts 1 -- bash -c 'echo x >> "$0"; exit 5' "$count" 2> "$work/log2"
status=$?
[ "$status" -eq 5 ] || fail "max-restarts: the supervisor exited $status, expected 5"
[ "$(wc -l < "$count")" -eq 2 ] || fail "max-restarts: ran $(wc -l < "$count") times, expected 2"

# --- 3. SIGTERM reaches the whole group; nothing is left.
# The command's own children: a background sleep in the same group.
pids=$work/pids3
"$supervise" --name term -- bash -c 'sleep 300 & echo "$$ $!" > "$0"; wait' "$pids" 2> "$work/log3" &
supervisor=$!
started_pids+=("$supervisor")
if wait_for_file "$pids" 10; then
  read -r leader grandchild < "$pids"
  [ "$(ps -o pgid= -p "$grandchild" | tr -d ' ')" = "$leader" ] || fail "term: the command's child is not in the command's group"
  [ "$(ps -o pgid= -p "$leader" | tr -d ' ')" != "$(ps -o pgid= -p $$ | tr -d ' ')" ] || fail "term: the command runs in the caller's group"
  kill -TERM "$supervisor"
  if wait_for_exit "$supervisor" 10; then
    [ "$waited_status" -eq 143 ] || fail "term: the supervisor exited $waited_status, expected 143 (the command's SIGTERM)"
    group_gone "$leader" || fail "term: processes of group $leader outlived the supervisor"
    kill -0 "$grandchild" 2>/dev/null && fail "term: the command's child $grandchild is still running"
  else
    fail "term: the supervisor did not end within 10 s of SIGTERM"
  fi
else
  fail "term: the command did not start"
fi

# --- 4. SIGINT too, to a command that traps it and exits 0 (a drain).
pids=$work/pids4
env --default-signal=INT "$supervise" -- bash -c 'trap "exit 0" INT; echo $$ > "$0"; while :; do sleep 0.1; done' "$pids" 2> "$work/log4" &
supervisor=$!
started_pids+=("$supervisor")
if wait_for_file "$pids" 10; then
  leader=$(cat "$pids")
  kill -INT "$supervisor"
  if wait_for_exit "$supervisor" 10; then
    [ "$waited_status" -eq 0 ] || fail "int: the supervisor exited $waited_status, expected the command's 0"
    group_gone "$leader" || fail "int: processes of group $leader outlived the supervisor"
  else
    fail "int: the supervisor did not end within 10 s of SIGINT"
  fi
else
  fail "int: the command did not start"
fi

# --- 5. A group that ignores SIGTERM gets SIGKILL after --grace.
pids=$work/pids5
"$supervise" --grace 1 -- bash -c 'trap "" TERM; sleep 300 & echo "$$ $!" > "$0"; while :; do sleep 0.1; done' "$pids" 2> "$work/log5" &
supervisor=$!
started_pids+=("$supervisor")
if wait_for_file "$pids" 10; then
  read -r leader grandchild < "$pids"
  start=$SECONDS
  kill -TERM "$supervisor"
  if wait_for_exit "$supervisor" 10; then
    [ $((SECONDS - start)) -ge 1 ] || fail "kill: SIGKILL came before the grace period"
    [ "$waited_status" -eq 137 ] || fail "kill: the supervisor exited $waited_status, expected 137 (SIGKILL)"
    group_gone "$leader" || fail "kill: processes of group $leader outlived the supervisor"
    grep -q "SIGKILL" "$work/log5" || fail "kill: no log of the SIGKILL"
  else
    fail "kill: the supervisor did not end within 10 s of SIGTERM"
  fi
else
  fail "kill: the command did not start"
fi

# --- 6. What a command leaves in its group when it exits is killed.
pids=$work/pids6
"$supervise" -- bash -c 'sleep 300 & echo "$$ $!" > "$0"; exit 0' "$pids" 2> "$work/log6"
status=$?
read -r leader grandchild < "$pids"
[ "$status" -eq 0 ] || fail "leftover: the supervisor exited $status, expected 0"
kill -0 "$grandchild" 2>/dev/null && fail "leftover: the command's child $grandchild outlived it"

# --- 7. Bad arguments.
"$supervise" --backoff x -- true 2> /dev/null
[ $? -eq 2 ] || fail "a bad --backoff did not exit 2"
"$supervise" 2> /dev/null
[ $? -eq 2 ] || fail "no command did not exit 2"

if [ "$failures" -gt 0 ]; then
  for log in "$work"/log*; do echo "--- $log" >&2; cat "$log" >&2; done
  echo "$failures check(s) failed" >&2
  exit 1
fi
echo "supervise: all checks passed"
