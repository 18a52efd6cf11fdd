#!/usr/bin/env bash
# One command for a parallel run on this machine:
#   launch/run_local.sh TP PP [xq worker options...]
#   launch/run_local.sh 2 2 --prompt "Once upon a time" --max-tokens 64
# Starts TP*PP ranks of `xq worker` under mpirun. Ranks may outnumber cores
# (--oversubscribe). orte_abort_on_non_zero_status 0 lets our own fault
# detection name a lost rank and the operation instead of mpirun killing the
# job first. For several hosts use the same line with --hostfile (see
# launch/hostfile.example).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 TP PP [xq worker options...]" >&2
  exit 2
fi
tp=$1 pp=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
root_flags=()
if [[ $(id -u) -eq 0 ]]; then root_flags=(--allow-run-as-root); fi
exec mpirun "${root_flags[@]}" --oversubscribe --mca orte_abort_on_non_zero_status 0 \
  -np $((tp * pp)) "$here/build/launch/xq" worker --tp "$tp" --pp "$pp" "$@"
