#!/usr/bin/env python3
"""`mpirun -np tp*pp xq worker --tp T --pp P --cache MODE` against the
single-process `xq generate` / `xq perplexity` on the same input, for each
cache mode asked for:
  * greedy token ids from three prompts must be identical. On a quantized
    model (--tie-margin > 0) a different token is accepted only at a step
    where the single-process top-1 / top-2 logit margin is below the given
    value (TP sums partial products in another order, and such a step is a
    coin toss); the comparison ends there, and the step is printed.
  * with --file, the perplexity must be within a relative bound of the
    single-process one: 1e-4 for fp16 and 8 bits. Lower bit widths get a
    wider bound (--low-bit-bound): the ranks' X differs from one process's by
    float rounding (another summation order in the all-reduce, attention
    merged from shards), and a rounding-level change moves a value across a
    2- or 3-bit quantization boundary now and then; one process moves by as
    much when only its prefill batching changes.
At pp > 1 XQuant-CL starts a new chain at each stage's first layer; the
single-process run is told the same layers (--cl-restarts).
With --expect-error, the job must instead fail quickly with that text."""
import argparse
import re
import subprocess
import sys


def run(cmd, timeout):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def stage_starts(stderr):
    """First layers of stages 1.. from the worker's rank lines (xquant-cl)."""
    return sorted({int(m) for m in re.findall(r"layers \[(\d+), \d+\)", stderr) if int(m) > 0})


def bits_of(mode):
    return 16 if mode == "fp16" else int(mode.rsplit("-", 1)[1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--xq", required=True)
    parser.add_argument("--mpirun", required=True, help="mpirun and its flags, space-separated")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--np", type=int, help="ranks (default tp * pp)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cache", default="fp16", help="comma-separated cache modes")
    parser.add_argument("--prompts", default="Once upon a time|The little dog|Lily and Tom went")
    parser.add_argument("--tie-margin", type=float, default=0.0)
    parser.add_argument("--file", help="text for the perplexity comparison")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--low-bit-bound", type=float, default=2e-3)
    parser.add_argument("--expect-error")
    parser.add_argument("--skip-missing-model", action="store_true")
    args = parser.parse_args()
    import os
    if args.skip_missing_model and not os.path.exists(args.model):
        print(f"SKIP: {args.model} not fetched")
        return 0
    np = args.np or args.tp * args.pp
    job = args.mpirun.split() + ["--mca", "orte_abort_on_non_zero_status", "0", "-np", str(np),
                                 args.xq, "worker", "--model", args.model, "--tp", str(args.tp),
                                 "--pp", str(args.pp), "--threads", "1"]
    if args.expect_error:
        result = run(job + ["--prompt", "Once upon a time", "--max-tokens", "4"], 60)
        output = result.stdout + result.stderr
        if args.expect_error not in output:
            print(output)
            print(f"FAIL: expected a failure saying '{args.expect_error}'")
            return 1
        print(f"ok: failed with '{args.expect_error}'")
        return 0

    failures = 0
    for mode in args.cache.split(","):
        restarts = ""
        for prompt in args.prompts.split("|"):
            worker = run(job + ["--cache", mode, "--prompt", prompt, "--max-tokens",
                                str(args.tokens), "--ids"], 300)
            if worker.returncode != 0 or "rank 0 (stage 0" not in worker.stderr:
                print(worker.stdout + worker.stderr)
                print(f"FAIL: {mode}: worker exited with {worker.returncode}")
                return 1
            if mode.startswith("xquant-cl") and args.pp > 1:
                restarts = ",".join(str(layer) for layer in stage_starts(worker.stderr))
            single = run([args.xq, "generate", "--model", args.model, "--prompt", prompt,
                          "--max-tokens", str(args.tokens), "--ids", "--margins", "--threads", "1",
                          "--cache", mode, "--cl-restarts", restarts], 300)
            if single.returncode != 0:
                print(single.stderr)
                return 1
            steps = [line.split() for line in single.stdout.split("\n") if line.strip()]
            parallel = worker.stdout.split()
            want = [s[0] for s in steps]
            if parallel == want and len(want) == args.tokens:
                print(f"ok: {mode} '{prompt}': {len(want)} tokens identical at tp {args.tp} x "
                      f"pp {args.pp}")
                continue
            step = next((i for i, (a, b) in enumerate(zip(parallel, want)) if a != b),
                        min(len(parallel), len(want)))
            margin = float(steps[step][1]) if step < len(steps) else float("inf")
            if step < min(len(parallel), len(want)) and margin < args.tie_margin:
                print(f"ok: {mode} '{prompt}': identical for {step} tokens, then a near tie "
                      f"(single-process margin {margin:.4f} < {args.tie_margin})")
                continue
            print(f"FAIL: {mode} '{prompt}' at step {step} (margin {margin:.4f}):\n"
                  f" single   {' '.join(want)}\n parallel {' '.join(parallel)}")
            failures += 1
        if not args.file:
            continue
        common = ["--model", args.model, "--file", args.file, "--ctx", str(args.ctx), "--chunks",
                  str(args.chunks), "--cache", mode, "--threads", "1"]
        # One micro-batch per chunk: kivi and xquant latents keep a partial
        # 128-token group in fp16, so the prefill split is part of the result.
        worker = run(job + common + ["--micro-batch", str(args.ctx)], 600)
        single = run([args.xq, "perplexity", "--cl-restarts", restarts] + common, 600)
        try:
            got = float(worker.stdout.split()[1])
            want = float(single.stdout.split()[1])
        except (IndexError, ValueError):
            print(worker.stdout + worker.stderr + single.stdout + single.stderr)
            print(f"FAIL: {mode}: no perplexity")
            return 1
        bound = 1e-4 if bits_of(mode) >= 8 else args.low_bit_bound
        difference = abs(got / want - 1)
        verdict = "ok" if difference <= bound else "FAIL"
        print(f"{verdict}: {mode} perplexity {got:.4f} at tp {args.tp} x pp {args.pp} vs "
              f"{want:.4f} in one process: relative difference {difference:.1e} (bound {bound:g})")
        failures += verdict == "FAIL"
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
