#!/usr/bin/env python3
"""Kills one rank of `mpirun xq worker` mid-generation (SIGKILL, as a crash)
and checks the fault rule on the real launch path: the whole job must
end within --limit seconds of the kill (30 by default), fail, name the
lost rank and the operation that was waiting for it, and leave no worker
process behind.

The job runs with `--mca orte_abort_on_non_zero_status 0` (as
launch/run_local.sh does), so mpirun does not end the job by itself: the
survivors' own timeout (XQ_COMM_TIMEOUT_SECONDS, set small by the caller) must
notice the loss and say so.

"Mid-generation": the checker waits until rank 0 has streamed --after token ids
(it flushes one per line with --ids), then kills the victim at once. On a model
that decodes faster than the output travels through mpirun (stories260K
finishes 400 tokens in well under 0.1 s), it freezes the victim with SIGSTOP on
the first token instead, which stops the whole job at its next collective, and
then kills it. Either way the job must not have finished generating: that is
checked from the tokens rank 0 printed. Prints the measured time to exit.

--at startup kills the victim instead while the ranks load the model, before
the grid's MPI_Comm_split / MPI_Comm_dup (blocking MPI calls without our
deadline)."""
import argparse
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time

OPERATIONS = ["all_reduce_sum", "all_gather", "reduce_scatter_sum", "broadcast", "send", "recv",
              "barrier"]


def descendants(root):
    """PIDs of every process below `root` (mpirun's ranks and any orted)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def worker_ranks(root):
    """{world rank: pid} of the `xq worker` processes below `root`."""
    ranks = {}
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if b"worker" not in argv[1:3]:
            continue
        for item in environ:
            if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                ranks[int(item.split(b"=", 1)[1])] = pid
    return ranks


def alive(pid):
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--xq", required=True)
    parser.add_argument("--mpirun", required=True, help="mpirun and its flags, space-separated")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--victim", type=int, required=True, help="world rank to kill")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--tokens", type=int, default=400, help="--max-tokens of the job")
    parser.add_argument("--after", type=int, default=5,
                        help="kill once rank 0 has printed this many tokens")
    parser.add_argument("--at", choices=["generation", "startup"], default="generation",
                        help="startup: kill the victim as soon as it maps the model (after "
                        "MPI_Init, before the grid's communicators exist) instead")
    parser.add_argument("--freeze", action="store_true",
                        help="SIGSTOP the victim on rank 0's first token, then SIGKILL it")
    parser.add_argument("--limit", type=float, default=30.0)
    parser.add_argument("--every-message", action="store_true",
                        help="fail if any rank's message names a rank other than the victim")
    args = parser.parse_args()
    np = args.tp * args.pp
    if not 0 <= args.victim < np:
        print(f"FAIL: --victim {args.victim} is not a rank of a {np}-rank job")
        return 1
    if not os.path.exists(args.model):
        print(f"SKIP: {args.model} is absent")
        return 77
    command = args.mpirun.split() + [
        "--mca", "orte_abort_on_non_zero_status", "0", "-np", str(np), args.xq, "worker",
        "--model", args.model, "--tp", str(args.tp), "--pp", str(args.pp), "--threads", "1",
        "--prompt", args.prompt, "--max-tokens", str(args.tokens), "--ids"]
    print("running:", " ".join(command), flush=True)
    start = time.monotonic()
    # stdout (rank 0's token ids) and stderr (everyone's messages) apart: the
    # token count comes from stdout alone.
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)
    selector = selectors.DefaultSelector()
    for stream, name in ((job.stdout, "stdout"), (job.stderr, "stderr")):
        os.set_blocking(stream.fileno(), False)
        selector.register(stream, selectors.EVENT_READ, name)
    output = {"stdout": b"", "stderr": b""}
    open_streams = 2

    def pump(timeout):
        nonlocal open_streams
        for key, _ in selector.select(timeout):
            data = key.fileobj.read()
            if data:
                output[key.data] += data
            elif data is not None:  # b"": end of file
                selector.unregister(key.fileobj)
                open_streams -= 1

    ranks, killed_at, frozen_at, failures = {}, None, None, []
    deadline = start + 30  # to get the ranks started and the first tokens out
    # Find the ranks (they appear while the model loads), then watch stdout.
    while killed_at is None:
        if time.monotonic() > deadline or job.poll() is not None:
            break
        if len(ranks) < np:
            ranks = worker_ranks(job.pid)
            pump(0.005)
            continue
        if args.at == "startup":
            victim = ranks[args.victim]
            try:
                with open(f"/proc/{victim}/maps", "rb") as f:
                    mapped = os.fsencode(os.path.realpath(args.model)) in f.read()
            except OSError:
                mapped = False
            if mapped:
                os.kill(victim, signal.SIGKILL)
                killed_at = time.monotonic()
                print(f"killed world rank {args.victim} (pid {victim}) {killed_at - start:.2f} s "
                      "after start, as it mapped the model", flush=True)
                break
            continue
        tokens = output["stdout"].count(b"\n")
        if tokens >= (1 if args.freeze else args.after):
            victim = ranks[args.victim]
            if args.freeze:
                os.kill(victim, signal.SIGSTOP)
                frozen_at = time.monotonic()
                time.sleep(0.5)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            printed = output["stdout"].count(b"\n")
            print(f"killed world rank {args.victim} (pid {victim}) "
                  f"{killed_at - start:.2f} s after start; rank 0 had printed {printed} tokens"
                  + (" when the victim was frozen" if args.freeze else ""), flush=True)
            break
        pump(0.05)
    if killed_at is None:
        failures.append("the kill never happened: "
                        + (f"the job ended first (exit code {job.returncode})"
                           if job.poll() is not None else
                           f"found ranks {sorted(ranks)} and {len(output['stdout'].split())} "
                           "tokens within 30 s"))
        killed_at = time.monotonic()

    # Wait for the job to end: up to the limit and 10 s, then end it ourselves
    # (all within ctest's 120 s, backtraces included).
    hang = False
    while job.poll() is None or open_streams:
        if time.monotonic() > killed_at + args.limit + 10:
            hang = True
            break
        pump(0.1)
        if job.poll() is not None and open_streams:
            pump(1.0)  # what the streams still hold
            break
    # mpirun returning is not the end of the job: on an abort, Open MPI 4.1's
    # mpirun sends its ranks SIGTERM and returns without reaping them, so a
    # rank can still exist after it (re-parented to init, SIGTERM pending, its
    # memory being torn down): on a loaded machine for tens of milliseconds
    # (seen: 40 ms, with two processes spinning on the two cores). The job ends
    # when its last rank is gone, which must be within the limit too; a rank
    # still alive then was left behind. (The worker asks the kernel to kill it
    # when its launcher exits, PR_SET_PDEATHSIG, so none can run on orphaned.)
    mpirun_returned = time.monotonic() - killed_at
    if not hang:
        while (any(alive(p) for p in ranks.values())
               and time.monotonic() < killed_at + max(args.limit, mpirun_returned + 1)):
            time.sleep(0.005)
    elapsed = time.monotonic() - killed_at
    if hang:
        survivors = {r: p for r, p in ranks.items() if alive(p)}
        failures.append(f"the job was still running {elapsed:.1f} s after the kill: a hang "
                        f"(ranks still alive: {sorted(survivors)})")
        if shutil.which("gdb"):  # where they hang, for the report
            for rank, pid in sorted(survivors.items()):
                try:
                    trace = subprocess.run(["gdb", f"/proc/{pid}/exe", "-p", str(pid), "-batch",
                                            "-ex", "thread apply all bt"], capture_output=True,
                                           text=True, timeout=10).stdout
                except subprocess.TimeoutExpired:
                    trace = "(gdb took more than 10 s)"
                print(f"--- world rank {rank} (pid {pid}) ---\n{trace}")
        os.killpg(job.pid, signal.SIGTERM)  # mpirun passes it on to its ranks
        try:
            job.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    stdout = output["stdout"].decode(errors="replace")
    stderr = output["stderr"].decode(errors="replace")
    print("--- stderr ---\n" + stderr.rstrip())
    tokens = stdout.split()
    print(f"--- stdout: {len(tokens)} token ids ---")

    # Every worker must be gone (the ranks were found before the kill, so one
    # re-parented to init is still seen).
    leftovers = [(r, p) for r, p in sorted(ranks.items()) if alive(p)]
    for _, pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    if leftovers:
        failures.append("worker processes left alive after the job ended: "
                        + ", ".join(f"rank {r} (pid {p})" for r, p in leftovers))
    if not hang:
        frozen = f" ({time.monotonic() - frozen_at:.1f} s after the freeze)" if frozen_at else ""
        print(f"job ended {elapsed:.1f} s after the kill{frozen} with exit code {job.returncode} "
              f"(mpirun returned after {mpirun_returned:.2f} s, its last rank was gone "
              f"{1000 * (elapsed - mpirun_returned):.0f} ms later)")
        if elapsed > args.limit:
            failures.append(f"took {elapsed:.1f} s after the kill, more than {args.limit:.0f} s")
        if job.returncode == 0:
            failures.append("exit code 0: the lost rank went unnoticed")
    # Rank 0 ends generation with "prompt N tokens in ...; generated M tokens".
    if args.at == "generation" and (len(tokens) >= args.tokens or "; generated " in stderr):
        failures.append(f"rank 0 finished generating ({len(tokens)} tokens): the kill came "
                        "after generation, not in the middle of it")
    # "lost rank R (world rank V)": R is the victim's rank in the group that
    # noticed (a TP group or a pipeline column), V its world rank; or "lost
    # world rank V (another group)" when the chain of waits led out of it.
    named = re.compile(rf"lost (rank \d+ \(world rank {args.victim}\)|world rank "
                       rf"{args.victim} \(another group\))")
    lines = [line for line in stderr.splitlines() if named.search(line)]
    if not lines:
        failures.append(f"no message names the lost rank ('{named.pattern}')")
    elif not any(op in line for line in lines for op in OPERATIONS):
        failures.append(f"the messages naming the lost rank name no operation "
                        f"({', '.join(OPERATIONS)})")
    else:
        print(f"{len(lines)} message(s) name it, e.g.: {lines[0].strip()}")
    # Each survivor that noticed prints "[world rank N] error: ..." (abort_job);
    # the first MPI_Abort may kill the others before they print. A message
    # blaming a live rank is reported, and fails with --every-message.
    wrong = [line.strip() for line in stderr.splitlines()
             if line.startswith("[world rank ") and "; lost " in line and not named.search(line)]
    for line in wrong:
        print(f"{'FAIL' if args.every_message else 'WARNING'}: blames another rank: {line}")
    if wrong and args.every_message:
        failures.append(f"{len(wrong)} message(s) name a rank other than world rank {args.victim}")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
