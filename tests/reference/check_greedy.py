#!/usr/bin/env python3
"""Greedy tokens of the engine (`xq generate`) against the numpy reference
(llama_numpy.py) on a GGUF model, teacher-forced: the reference runs greedy in
fp32, and the engine is fed the reference's tokens (--force-ids), printing each
step's argmax and top-1 minus top-2 margin. The engine's decode multiplies
int8-quantized activations with the quantized weights (as llama.cpp does),
which moves its logits from fp32 ones by up to its int8 noise floor E
(tests/mpi/logit_bounds.h; SmolLM2: 1.42, the largest mpi.tp2 measures) per
draw, and its fp16 cache rounds every K and V value by at most 2^-11 of it, at
most 1/8 of an int8 rounding error of the same value, so the logits differ by
at most B = 2 E + E / 4 (2 E: the spread of the noise's maxima, as there).
Checked at every step: the margins within 2 B of each other (top-1 and top-2
each move by at most B), and the argmaxes equal where the reference's margin
exceeds 2 B.

    check_greedy.py XQ MODEL.gguf NOISE_FLOOR
"""
import os
import subprocess
import sys

STEPS = 16
PROMPTS = ["The capital of France is", "Once upon a time"]


def main():
    xq, model, noise = sys.argv[1], sys.argv[2], float(sys.argv[3])
    bound = 2 * noise + noise / 4
    if not os.path.exists(model):
        print(f"SKIP: {model} not fetched (run launch/setup.sh)")
        return 0
    try:
        import numpy  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as e:
        print(f"SKIP: the numpy reference needs numpy and gguf from PyPI ({e})")
        return 0
    here = os.path.dirname(os.path.abspath(__file__))
    failed = False
    for prompt in PROMPTS:
        ids = subprocess.run([xq, "tokenize", "--model", model, "--prompt", prompt], check=True,
                             capture_output=True, text=True).stdout.strip()
        ref = subprocess.run([sys.executable, os.path.join(here, "llama_numpy.py"), model, "--ids", ids,
                              "--steps", str(STEPS)], check=True, capture_output=True, text=True).stdout.split("\n")
        ref = [line.split() for line in ref if line.strip()]
        forced = ",".join(token for token, _ in ref)
        ours = subprocess.run([xq, "generate", "--model", model, "--prompt", prompt, "--ids",
                               "--margins", "--force-ids", forced], check=True, capture_output=True,
                              text=True).stdout.split("\n")
        ours = [line.split() for line in ours if line.strip()]
        if len(ours) != len(ref):
            print(f"{prompt!r}: FAIL: {len(ours)} engine steps for {len(ref)} forced tokens")
            failed = True
            continue
        compared = agree = 0
        for step, ((token, margin), (mine, my_margin)) in enumerate(zip(ref, ours)):
            margin, my_margin = float(margin), float(my_margin)
            agree += token == mine
            if abs(margin - my_margin) > 2 * bound:
                print(f"{prompt!r}: step {step}: FAIL: margin {my_margin} where the reference's "
                      f"is {margin}, more than 2 B = {2 * bound:.3g} apart")
                failed = True
            if margin > 2 * bound:
                compared += 1
                if token != mine:
                    print(f"{prompt!r}: step {step}: FAIL: engine {mine}, reference {token} at "
                          f"reference margin {margin} > 2 B = {2 * bound:.3g}")
                    failed = True
        print(f"{prompt!r}: {len(ref)} teacher-forced steps, B = {bound:.3g}: argmax equal at "
              f"{agree}, compared at {compared}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
