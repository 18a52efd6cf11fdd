#!/usr/bin/env python3
"""Runs tests/mpi/fault_probe under mpirun and checks that a lost rank ends the
job quickly and by name: the job must end within --limit seconds (30 by
default: the fault rule's bound), fail, and its output must contain every --expect string (for
example the lost rank and the operation). Prints the job's output."""
import argparse
import os
import signal
import subprocess
import sys
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=float, default=30.0)
    parser.add_argument("--expect", action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    print("running:", " ".join(command), flush=True)
    start = time.monotonic()
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        out, _ = job.communicate(timeout=max(60.0, 2 * args.limit))
    except subprocess.TimeoutExpired:
        # mpirun passes SIGTERM on to its ranks; SIGKILL whatever is left.
        os.killpg(job.pid, signal.SIGTERM)
        try:
            out, _ = job.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            out, _ = job.communicate()
        print(out.decode(errors="replace"))
        print(f"FAIL: the job was still running after {time.monotonic() - start:.1f} s: a hang")
        return 1
    output, code = out.decode(errors="replace"), job.returncode
    elapsed = time.monotonic() - start
    print(output)
    print(f"job ended after {elapsed:.1f} s with exit code {code}")
    failures = []
    if elapsed > args.limit:
        failures.append(f"took {elapsed:.1f} s, more than {args.limit:.0f} s")
    if code == 0:
        failures.append("exit code 0: the fault went unnoticed")
    for text in args.expect:
        if text not in output:
            failures.append(f"output does not contain {text!r}")
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
