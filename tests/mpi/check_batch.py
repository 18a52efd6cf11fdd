#!/usr/bin/env python3
"""`mpirun -np tp*pp xq worker --input REQUESTS --output RESULTS` against the
single-process `xq batch` on the same 64 requests (TinyStories prompts of 3
to ~250 tokens, arriving two per scheduler step, greedy, 12 tokens each,
with the top-2 logprobs), for each cache mode asked for. XQuant-CL at pp > 1
starts a chain at each stage's first layer; --cl-restarts tells the single
process the same layers.

At tp 1 the ranks run what one process runs (pipeline stages split layers,
micro-batches are whole segments and every kernel treats each row alone), so
every request's token ids must be identical. At tp > 1 the TP group sums
partial products in another order; a request may then differ only from a
step where the single process's top-1 minus top-2 logprob (= logit) margin
is at most 2 B, B the per-mode logit bound of tests/mpi/logit_bounds.h given
with --bound MODE=B (a step's logits move by at most B on either side).
Every line must also come back in order, with the same finish reason."""
import argparse
import json
import os
import subprocess
import sys
import tempfile


def prompts(text_path, count):
    text = open(text_path, encoding="utf-8").read()
    out, at = [], 0
    for i in range(count):
        words = 2 + (i * 37) % 150
        end = at
        for _ in range(words):
            nxt = text.find(" ", end + 1)
            if nxt < 0:
                break
            end = nxt
        out.append(text[at:end])
        nxt = text.find("\n\n", end)
        at = 0 if nxt < 0 else nxt + 2
    return out


def run(cmd, what):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        sys.exit(f"FAIL: {what} exited {p.returncode}\n{p.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xq", required=True)
    ap.add_argument("--mpirun", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--cache", default="fp16")
    ap.add_argument("--bound", default="", help="MODE=B,... logit bounds at tp > 1")
    ap.add_argument("--cl-restarts", default="",
                    help="the first layers of stages 1.. (xquant-cl at pp > 1 starts a chain "
                         "there; the single process is told the same)")
    args = ap.parse_args()
    bounds = dict((kv.split("=")[0], float(kv.split("=")[1]))
                  for kv in args.bound.split(",") if kv)
    if not os.path.exists(args.model):
        print(f"SKIP: {args.model} is absent")
        return
    tmp = tempfile.mkdtemp()
    requests = os.path.join(tmp, "requests.jsonl")
    with open(requests, "w") as f:
        for i, p in enumerate(prompts(args.text, 64)):
            f.write(json.dumps({"prompt": p, "max_tokens": 12, "ignore_eos": True,
                                "logprobs": 2, "arrival_step": i // 2}) + "\n")
    failures = 0
    for mode in args.cache.split(","):
        common = ["--model", args.model, "--input", requests, "--cache", mode,
                  "--max-sequences", "16", "--max-batch-tokens", "256"]
        single = os.path.join(tmp, f"single-{mode}.jsonl")
        ranks = os.path.join(tmp, f"ranks-{mode}.jsonl")
        restarts = (["--cl-restarts", args.cl_restarts]
                    if mode.startswith("xquant-cl") and args.cl_restarts else [])
        run([args.xq, "batch", *common, *restarts, "--output", single], f"xq batch --cache {mode}")
        run(args.mpirun.split() + ["-np", str(args.tp * args.pp), args.xq, "worker", "--tp",
             str(args.tp), "--pp", str(args.pp), *common, "--output", ranks],
            f"worker tp {args.tp} pp {args.pp} --cache {mode}")
        a = [json.loads(line) for line in open(single)]
        b = [json.loads(line) for line in open(ranks)]
        if len(a) != 64 or len(b) != 64:
            print(f"FAIL {mode}: {len(a)} and {len(b)} result lines, want 64")
            failures += 1
            continue
        differ, near = 0, 0
        for i, (x, y) in enumerate(zip(a, b)):
            if "error" in x or "error" in y or x["line"] != y["line"]:
                print(f"FAIL {mode} line {i + 1}: {x.get('error')} / {y.get('error')}")
                failures += 1
                continue
            if x["token_ids"] == y["token_ids"]:
                continue
            differ += 1
            k = next(k for k, (s, t) in enumerate(zip(x["token_ids"], y["token_ids"])) if s != t)
            top = x["logprobs"][k]["top"]
            margin = top[0]["logprob"] - top[1]["logprob"]
            limit = 2 * bounds.get(mode, 0.0) if args.tp > 1 else 0.0
            if margin > limit:
                print(f"FAIL {mode} line {i + 1}: differs at step {k} where the single "
                      f"process's margin is {margin:.4f} > {limit:.4f}")
                failures += 1
            else:
                near += 1
        print(f"{mode} tp {args.tp} pp {args.pp}: {64 - differ} of 64 identical, "
              f"{near} differ after a near tie")
    if failures:
        sys.exit(f"FAIL: {failures} problem(s)")
    print("PASS")


if __name__ == "__main__":
    main()
