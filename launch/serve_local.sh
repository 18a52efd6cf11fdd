#!/usr/bin/env bash
# A local serving cluster on loopback: one coordinator and N replicas (each
# an mpirun of tp x pp ranks under launch/supervise.sh, which restarts it
# when it fails), then one streamed completion through `xq client`.
#
# usage: launch/serve_local.sh [options] [-- WORKER_OPTIONS...]
#
#   --port P           the coordinator's port (default 50051)
#   --replica-port Q   the first replica's port; replica i listens on Q+i
#                      (default: P+10)
#   --http-port H      also serve the OpenAI-compatible HTTP API on H
#                      (default: off)
#   --replicas N       replicas (default 1)
#   --tp T, --pp P     ranks per replica: tensor x pipeline (default 2 x 1)
#   --model PATH       model file (default: xq's default model)
#   --tokenizer PATH   llama2.c tokenizer, for a llama2.c model
#   --api-key KEY      every server asks for it; the client sends it
#   --prompt TEXT      the completion to stream (default "Once upon a time")
#   --max-tokens N     (default 32)
#   --keep             no completion: stay up until Ctrl-C or SIGTERM
#   --ready-timeout S  how long the coordinator may take to be serving
#                      (default 300)
#   --log-dir DIR      one log per process (default: a new temporary folder)
#   --build DIR        the build folder (default: build in the repository)
#   --xq PATH          the xq binary (default: BUILD/launch/xq)
#   --dry-run          print the commands and start nothing
#
# WORKER_OPTIONS go to every `xq worker --serve` (e.g. -- --cache xquant
# --max-sequences 8). Whatever the script started is stopped when it ends:
# after the completion, on an error, or on Ctrl-C / SIGTERM.
#
# Example: launch/serve_local.sh --replicas 2 --tp 2 --keep
#          build/launch/xq client --prompt "Hello" (from another shell)
set -u

root=$(cd "$(dirname "$0")/.." && pwd)
port=50051
replica_port=""
http_port=""
replicas=1
tp=2
pp=1
model=""
tokenizer=""
api_key=""
prompt="Once upon a time"
max_tokens=32
keep=0
ready_timeout=300
log_dir=""
build="$root/build"
xq=""
dry_run=0
worker_args=()

usage() {
  sed -n '6,29p' "$0" | sed 's/^# \{0,1\}//'
  exit "$1"
}
need() { [ "$1" -ge 2 ] || { echo "serve_local: $2 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --port) need $# "$1"; port=$2; shift 2 ;;
    --replica-port) need $# "$1"; replica_port=$2; shift 2 ;;
    --http-port) need $# "$1"; http_port=$2; shift 2 ;;
    --replicas) need $# "$1"; replicas=$2; shift 2 ;;
    --tp) need $# "$1"; tp=$2; shift 2 ;;
    --pp) need $# "$1"; pp=$2; shift 2 ;;
    --model) need $# "$1"; model=$2; shift 2 ;;
    --tokenizer) need $# "$1"; tokenizer=$2; shift 2 ;;
    --api-key) need $# "$1"; api_key=$2; shift 2 ;;
    --prompt) need $# "$1"; prompt=$2; shift 2 ;;
    --max-tokens) need $# "$1"; max_tokens=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --ready-timeout) need $# "$1"; ready_timeout=$2; shift 2 ;;
    --log-dir) need $# "$1"; log_dir=$2; shift 2 ;;
    --build) need $# "$1"; build=$2; shift 2 ;;
    --xq) need $# "$1"; xq=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; worker_args=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "serve_local: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for pair in "port:$port" "replicas:$replicas" "tp:$tp" "pp:$pp" "max-tokens:$max_tokens" \
            "ready-timeout:$ready_timeout" "replica-port:${replica_port:-1}" "http-port:${http_port:-1}"; do
  [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || { echo "serve_local: --${pair%%:*} wants a positive integer" >&2; exit 2; }
done
[ -n "$replica_port" ] || replica_port=$((port + 10))
[ -n "$xq" ] || xq="$build/launch/xq"
supervise="$root/launch/supervise.sh"
if [ "$dry_run" -eq 0 ] && [ ! -x "$xq" ]; then
  echo "serve_local: no xq at $xq (build it: ninja -C build xq)" >&2
  exit 2
fi

auth=()
[ -n "$api_key" ] && auth=(--api-key "$api_key")
model_args=()
[ -n "$model" ] && model_args+=(--model "$model")
[ -n "$tokenizer" ] && model_args+=(--tokenizer "$tokenizer")
mpirun_args=(mpirun)
[ "$(id -u)" -eq 0 ] && mpirun_args+=(--allow-run-as-root)
mpirun_args+=(--oversubscribe --mca orte_abort_on_non_zero_status 0 -np $((tp * pp)))

coordinator_cmd=("$xq" coordinator --listen "127.0.0.1:$port" "${auth[@]}")
[ -n "$http_port" ] && coordinator_cmd+=(--http-listen "127.0.0.1:$http_port")
replica_cmd() {  # the command of replica $1
  local listen="127.0.0.1:$((replica_port + $1))"
  replica=("$supervise" --name "replica$1" -- "${mpirun_args[@]}" "$xq" worker --serve
           --tp "$tp" --pp "$pp" --listen "$listen" --coordinator "127.0.0.1:$port"
           "${model_args[@]}" "${auth[@]}" "${worker_args[@]}")
}

if [ "$dry_run" -eq 1 ]; then
  echo "${coordinator_cmd[*]}"
  for ((i = 0; i < replicas; i++)); do replica_cmd "$i"; echo "${replica[*]}"; done
  [ "$keep" -eq 1 ] || echo "$xq client --address 127.0.0.1:$port --prompt '$prompt' --max-tokens $max_tokens ${auth[*]}"
  exit 0
fi

# A port something already listens on would make a server fail to start;
# say so now rather than after the ready timeout.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$port" $http_port $(seq "$replica_port" $((replica_port + replicas - 1))); do
  if port_in_use "$p"; then
    echo "serve_local: port $p is in use (choose others with --port / --replica-port)" >&2
    exit 1
  fi
done

if [ -z "$log_dir" ]; then
  log_dir=$(mktemp -d "${TMPDIR:-/tmp}/xq_serve_local.XXXXXX")
else
  mkdir -p "$log_dir" || exit 1
fi
echo "serve_local: logs in $log_dir"

pids=()   # every process started, each the leader of its own session
names=()
stopped=0
client_pid=0
stop_all() {
  [ "$stopped" -eq 1 ] && return
  stopped=1
  if [ "$client_pid" -gt 0 ]; then
    kill -TERM "$client_pid" 2>/dev/null
    wait "$client_pid" 2>/dev/null
  fi
  [ ${#pids[@]} -gt 0 ] || return
  echo "serve_local: stopping ${names[*]}" >&2
  local i pid waited
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  # supervise.sh sends SIGKILL to a replica 15 s after SIGTERM; 25 s covers it.
  for ((i = 0; i < ${#pids[@]}; i++)); do
    pid=${pids[$i]}
    for ((waited = 0; waited < 250; waited++)); do
      kill -0 "$pid" 2>/dev/null || break
      [[ $(ps -o stat= -p "$pid" 2>/dev/null) == Z* ]] && break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null && [[ $(ps -o stat= -p "$pid" 2>/dev/null) != Z* ]]; then
      echo "serve_local: ${names[$i]} (pid $pid) did not stop: SIGKILL to its process group" >&2
      kill -KILL -- "-$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
  done
}
trap stop_all EXIT
trap 'echo "serve_local: interrupted" >&2; exit 130' INT
trap 'exit 143' TERM

# True while process $1 runs (not a zombie).
alive() { kill -0 "$1" 2>/dev/null && [[ $(ps -o stat= -p "$1" 2>/dev/null) != Z* ]]; }

# setsid: each in its own session, so that a terminal's Ctrl-C reaches this
# script alone and the servers stop in order, through stop_all.
setsid "${coordinator_cmd[@]}" > "$log_dir/coordinator.log" 2>&1 < /dev/null &
pids+=($!)
names+=(coordinator)
echo "coordinator: pid $!, 127.0.0.1:$port, log $log_dir/coordinator.log"
for ((i = 0; i < replicas; i++)); do
  replica_cmd "$i"
  setsid "${replica[@]}" > "$log_dir/replica$i.log" 2>&1 < /dev/null &
  pids+=($!)
  names+=("replica$i")
  echo "replica$i: supervisor pid $!, 127.0.0.1:$((replica_port + i)), tp $tp x pp $pp, log $log_dir/replica$i.log"
done

# Ready when the coordinator serves Generation (it has a ready replica).
deadline=$((SECONDS + ready_timeout))
until "$xq" client --address "127.0.0.1:$port" "${auth[@]}" --wait-ready 2 > /dev/null 2>&1; do
  if ! alive "${pids[0]}"; then
    echo "serve_local: the coordinator exited; its log ($log_dir/coordinator.log) ends:" >&2
    tail -n 20 "$log_dir/coordinator.log" >&2
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "serve_local: not ready after $ready_timeout s; see the logs in $log_dir" >&2
    exit 1
  fi
done
echo "serve_local: ready at 127.0.0.1:$port"
[ -n "$http_port" ] && echo "serve_local: OpenAI-compatible HTTP at http://127.0.0.1:$http_port/v1"

if [ "$keep" -eq 1 ]; then
  echo "serve_local: up until Ctrl-C or SIGTERM (e.g. $xq client --address 127.0.0.1:$port --prompt 'Hello')"
  while alive "${pids[0]}"; do
    sleep 1 &
    wait $!
  done
  echo "serve_local: the coordinator exited; see $log_dir/coordinator.log" >&2
  exit 1
fi

# In the background, so that a SIGTERM to this script is handled at once
# (the client cancels its call on SIGTERM).
"$xq" client --address "127.0.0.1:$port" "${auth[@]}" --prompt "$prompt" --max-tokens "$max_tokens" &
client_pid=$!
wait "$client_pid"
status=$?
client_pid=0
[ -t 1 ] || echo
exit "$status"
