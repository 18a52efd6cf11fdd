#!/usr/bin/env python3
"""`xq perplexity` against the numpy reference (llama_numpy.py) on the same
token ids and chunks: the protocol and the forward pass must agree within
TOLERANCE (relative). Token ids come from `xq tokenize`, whose tokenizer is
checked separately against llama.cpp's test vectors. The reference rounds the
inputs of block-quantized products to int8 as the engine does
(--int8-activations); without it SmolLM2 Q4_1 moves by about 1.2%.

    check_perplexity.py XQ MODEL TEXT CTX CHUNKS [TOLERANCE]
"""
import os
import re
import subprocess
import sys
import tempfile

TOLERANCE = 2e-3


def main():
    xq, model, text, ctx, chunks = sys.argv[1:6]
    tolerance = float(sys.argv[6]) if len(sys.argv) > 6 else TOLERANCE
    if not os.path.exists(model):
        print(f"SKIP: {model} not fetched (run launch/setup.sh)")
        return 0
    try:
        import numpy  # noqa: F401
        if model.endswith(".gguf"):
            import gguf  # noqa: F401
    except ImportError as e:
        print(f"SKIP: the numpy reference needs numpy and gguf from PyPI ({e})")
        return 0
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.NamedTemporaryFile("w", suffix=".ids") as ids:
        subprocess.run([xq, "tokenize", "--model", model, "--file", text, "--bos", "on"], check=True, stdout=ids)
        ids.flush()
        ref = subprocess.run([sys.executable, os.path.join(here, "llama_numpy.py"), model, "--perplexity", ids.name,
                              "--ctx", ctx, "--chunks", chunks, "--int8-activations"], check=True, capture_output=True, text=True).stdout
    ours = subprocess.run([xq, "perplexity", "--model", model, "--file", text, "--ctx", ctx, "--chunks", chunks],
                          check=True, capture_output=True, text=True).stdout
    ppl_ref = float(re.search(r"perplexity ([0-9.]+)", ref).group(1))
    ppl_ours = float(re.search(r"perplexity ([0-9.]+)", ours).group(1))
    rel = abs(ppl_ours - ppl_ref) / ppl_ref
    print(f"reference: {ref.strip()}\nengine:    {ours.strip()}\nrelative difference {rel:.2e} (tolerance {tolerance})")
    return 0 if rel <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
