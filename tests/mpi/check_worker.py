#!/usr/bin/env python3
"""`mpirun -np tp*pp xq worker --tp T --pp P` against the single-process
`xq generate` on the same prompt: the greedy token ids must be identical.
With --expect-error, the job must instead fail quickly with that text (a grid
that does not match the job size)."""
import argparse
import subprocess
import sys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--xq", required=True)
    parser.add_argument("--mpirun", required=True, help="mpirun and its flags, space-separated")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--np", type=int, help="ranks (default tp * pp)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--expect-error")
    args = parser.parse_args()
    np = args.np or args.tp * args.pp
    job = args.mpirun.split() + ["-np", str(np), args.xq, "worker", "--model", args.model,
                                 "--tp", str(args.tp), "--pp", str(args.pp), "--threads", "1",
                                 "--max-tokens", str(args.tokens), "--ids"]
    if args.expect_error:
        run = subprocess.run(job + ["--prompt", "Once upon a time"], capture_output=True,
                             text=True, timeout=60)
        output = run.stdout + run.stderr
        if run.returncode == 0 or args.expect_error not in output:
            print(output)
            print(f"FAIL: expected a failure saying '{args.expect_error}'")
            return 1
        print(f"ok: failed with '{args.expect_error}'")
        return 0
    for prompt in ["Once upon a time", "The little dog", "Lily and Tom went"]:
        single = subprocess.run([args.xq, "generate", "--model", args.model, "--prompt", prompt,
                                 "--max-tokens", str(args.tokens), "--ids"],
                                capture_output=True, text=True, timeout=60, check=True).stdout.split()
        run = subprocess.run(job + ["--prompt", prompt], capture_output=True, text=True,
                             timeout=120)
        if run.returncode != 0:
            print(run.stdout + run.stderr)
            print(f"FAIL: worker exited with {run.returncode}")
            return 1
        parallel = run.stdout.split()
        if parallel != single or len(single) != args.tokens:
            print(f"FAIL on '{prompt}':\n single   {' '.join(single)}\n parallel {' '.join(parallel)}")
            return 1
        print(f"ok: '{prompt}': {len(single)} tokens identical at tp {args.tp} x pp {args.pp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
