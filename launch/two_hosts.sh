#!/usr/bin/env bash
# A pipeline-parallel run across two "hosts" on one machine:
#   launch/two_hosts.sh [xq worker options...]
#   launch/two_hosts.sh --model ../shared/models/stories260K.bin --prompt "Once upon a time" --ids
# Why: `xq worker` under one mpirun on one machine talks over shared memory and
# loopback, which says nothing about two machines. Here each pipeline stage
# (tp 1 x pp 2) runs on its own network stack and hostname, and the only path
# between them is a veth pair, as between two hosts joined by a cable.
#
# What it does (needs root, or CAP_SYS_ADMIN + CAP_NET_ADMIN):
#   - two network namespaces xq-host-a-PID and xq-host-b-PID joined by a veth
#     pair, 10.77.0.1/24 in A and 10.77.0.2/24 in B (the subnet exists only
#     inside the two namespaces, so concurrent runs do not collide);
#   - mpirun runs inside A (UTS hostname xq-host-a) with a hostfile listing
#     10.77.0.1 and 10.77.0.2, one slot each; Open MPI's rsh launcher "sshes" to
#     10.77.0.2 through an agent script that runs the command inside B (UTS
#     hostname xq-host-b), so an orted starts in B and talks TCP to mpirun in
#     A: a genuine two-host launch, with no sshd;
#   - Open MPI over TCP only: pml ob1, btl tcp,self (no shared memory, which
#     would otherwise cross namespaces through /dev/shm), btl and oob limited to
#     10.77.0.0/24.
#   - each rank prints one line to stderr before it starts the worker
#     ("two_hosts: rank R host H netns NS net:[inode] addr A"), and the script
#     prints the wall time and the bytes that crossed the veth
#     ("two_hosts: veth bytes a->b X b->a Y"); rank 0's stdout is the worker's.
#   - namespaces, veths and the temporary directory are removed on exit,
#     whatever the outcome.
# Environment: XQ_BIN (default build/launch/xq), MPIRUN (default mpirun).
# Exit status: 0 when both ranks exited 0, else mpirun's status or the first
# failing rank's (each rank records its own, see below); 1 when xq or mpirun
# is missing; 77 with "two_hosts: cannot create network namespaces here:
# REASON" when the namespaces or the veth pair cannot be made (not root, no
# `ip`, a container that forbids it), so a test can skip.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
xq=${XQ_BIN:-$here/build/launch/xq}
mpirun=${MPIRUN:-mpirun}
ns_a=xq-host-a-$$ ns_b=xq-host-b-$$
veth_a=xqa$$ veth_b=xqb$$ # interface names are at most 15 characters
addr_a=10.77.0.1 addr_b=10.77.0.2 subnet=10.77.0.0/24

say() { echo "two_hosts: $*" >&2; }
cannot() {
  say "cannot create network namespaces here: $*"
  exit 77
}

[[ -x $xq ]] || { say "no xq binary at $xq (build it, or set XQ_BIN)"; exit 1; }
command -v "$mpirun" >/dev/null || { say "no $mpirun (install Open MPI, or set MPIRUN)"; exit 1; }
command -v ip >/dev/null || cannot "no 'ip' command (install iproute2)"
command -v unshare >/dev/null || cannot "no 'unshare' command (install util-linux)"

work=""
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  local ns pids sig
  for ns in "$ns_a" "$ns_b"; do
    ip netns list 2>/dev/null | grep -qw -- "$ns" || continue
    # Whatever still runs inside is ours (mpirun, orted, ranks after a failure
    # or a signal): TERM, two seconds' grace, then KILL.
    for sig in TERM TERM TERM TERM TERM TERM TERM TERM TERM TERM KILL; do
      pids=$(ip netns pids "$ns" 2>/dev/null) || break
      [[ -n $pids ]] || break
      # shellcheck disable=SC2086 # one pid per word
      kill -s "$sig" $pids 2>/dev/null || true
      sleep 0.2
    done
    ip netns del "$ns" 2>/dev/null || true # takes its end of the veth pair, and the peer, with it
  done
  ip link del "$veth_a" 2>/dev/null || true # if it never moved into A
  [[ -z $work ]] || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
trap 'exit 141' PIPE

who="uid $(id -u)"
[[ $(id -u) -eq 0 ]] && who="root"
try() { # run a setup step; on failure, skip with its own error message
  local err
  if ! err=$("$@" 2>&1); then cannot "'$*' failed as $who: ${err//$'\n'/ }"; fi
}
try ip netns add "$ns_a"
try ip netns add "$ns_b"
try ip link add "$veth_a" type veth peer name "$veth_b"
try ip link set "$veth_a" netns "$ns_a"
try ip link set "$veth_b" netns "$ns_b"
try ip -n "$ns_a" addr add "$addr_a/24" dev "$veth_a"
try ip -n "$ns_b" addr add "$addr_b/24" dev "$veth_b"
for ns in "$ns_a" "$ns_b"; do try ip -n "$ns" link set lo up; done
try ip -n "$ns_a" link set "$veth_a" up
try ip -n "$ns_b" link set "$veth_b" up
try ip netns exec "$ns_a" unshare --uts true
# The link takes a moment to come up (operstate "up" once both ends are).
for _ in $(seq 50); do
  [[ $(ip netns exec "$ns_a" cat "/sys/class/net/$veth_a/operstate") == up ]] && break
  sleep 0.1
done

work=$(mktemp -d /tmp/xq-two-hosts.XXXXXX)
printf '%s slots=1\n%s slots=1\n' "$addr_a" "$addr_b" >"$work/hostfile"
# The "ssh" of this two-host cluster. Open MPI's rsh launcher runs
# `AGENT HOST COMMAND...` and, as ssh would, the command words are one shell
# line. 10.77.0.1 is mpirun's own host, so normally only B is asked for.
cat >"$work/agent" <<EOF
#!/bin/sh
host=\$1
shift
case \$host in
  $addr_a) ns=$ns_a name=xq-host-a ;;
  $addr_b) ns=$ns_b name=xq-host-b ;;
  *) echo "two_hosts agent: unknown host \$host" >&2; exit 255 ;;
esac
exec ip netns exec "\$ns" unshare --uts sh -c "hostname \$name; \$*"
EOF
chmod +x "$work/agent"

root_flags=()
if [[ $(id -u) -eq 0 ]]; then root_flags=(--allow-run-as-root); fi
# Each rank names its host and namespace, runs the worker and records its exit
# status: with orte_abort_on_non_zero_status 0 (as in run_local.sh, so the
# worker's own fault detection can name a lost rank) mpirun 4.1 exits 0 even
# when a rank fails, so the script takes the status from these files.
# shellcheck disable=SC2016 # expanded by the rank's shell, not here
rank_line='echo "two_hosts: rank $OMPI_COMM_WORLD_RANK host $(hostname) netns $(ip netns identify) $(readlink /proc/self/ns/net) addr $(ip -4 -o addr show scope global | awk "{print \$4}" | tr "\n" " ")" >&2
"$0" "$@"; s=$?; echo $s >"'"$work"'/status.$OMPI_COMM_WORLD_RANK"; exit $s'

bytes() { ip netns exec "$ns_a" cat "/sys/class/net/$veth_a/statistics/$1_bytes"; }
tx0=$(bytes tx) rx0=$(bytes rx)
start=$(date +%s.%N)
status=0
ip netns exec "$ns_a" unshare --uts sh -c 'hostname xq-host-a; exec "$@"' sh \
  "$mpirun" "${root_flags[@]}" --hostfile "$work/hostfile" \
  --mca plm_rsh_agent "$work/agent" \
  --mca pml ob1 --mca btl tcp,self \
  --mca btl_tcp_if_include "$subnet" --mca oob_tcp_if_include "$subnet" \
  --mca orte_abort_on_non_zero_status 0 \
  -np 2 sh -c "$rank_line" "$xq" worker --tp 1 --pp 2 "$@" </dev/null &
# In the background so that a signal to this script runs the traps at once.
wait $! || status=$?
end=$(date +%s.%N)
tx1=$(bytes tx) rx1=$(bytes rx)
say "wall $(awk "BEGIN{printf \"%.2f\", $end - $start}") s"
say "veth bytes a->b $((tx1 - tx0)) b->a $((rx1 - rx0))"
for rank in 0 1; do
  if [[ ! -f $work/status.$rank ]]; then
    say "rank $rank did not finish (mpirun exit status $status)"
    [[ $status -ne 0 ]] || status=1
  elif [[ $(<"$work/status.$rank") -ne 0 ]]; then
    say "rank $rank exited with status $(<"$work/status.$rank")"
    [[ $status -ne 0 ]] || status=$(<"$work/status.$rank")
  fi
done
exit "$status"
