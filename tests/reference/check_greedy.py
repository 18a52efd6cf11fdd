#!/usr/bin/env python3
"""Greedy tokens of the engine (`xq generate`) against the numpy reference
(llama_numpy.py) on a GGUF model. The engine's decode multiplies int8-quantized
activations with the quantized weights (as llama.cpp does), so at a near-tie the
two may pick different tokens: the check passes only if they agree up to a step
where the reference's top-2 logit margin is below MARGIN, and on at least
MIN_AGREE tokens.

    check_greedy.py XQ MODEL.gguf
"""
import os
import subprocess
import sys

MARGIN = 0.5
MIN_AGREE = 4
STEPS = 16
PROMPTS = ["The capital of France is", "Once upon a time"]


def main():
    xq, model = sys.argv[1], sys.argv[2]
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
        ours = subprocess.run([xq, "generate", "--model", model, "--prompt", prompt, "--ids",
                               "--max-tokens", str(STEPS)], check=True, capture_output=True,
                              text=True).stdout.split()
        ref = subprocess.run([sys.executable, os.path.join(here, "llama_numpy.py"), model, "--ids", ids,
                              "--steps", str(STEPS)], check=True, capture_output=True, text=True).stdout.split("\n")
        ref = [line.split() for line in ref if line.strip()]
        agree = 0
        for step, (token, margin) in enumerate(ref):
            if step < len(ours) and ours[step] == token:
                agree += 1
                continue
            verdict = "near-tie, accepted" if float(margin) < MARGIN else "FAIL"
            print(f"{prompt!r}: step {step}: engine {ours[step] if step < len(ours) else None}, "
                  f"reference {token} (reference margin {margin}): {verdict}")
            failed |= float(margin) >= MARGIN
            break
        print(f"{prompt!r}: {agree}/{len(ref)} greedy tokens agree before any divergence")
        failed |= agree < MIN_AGREE
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
