#!/usr/bin/env python3
"""An independent reference for the engine: a Llama forward pass in numpy over a
GGUF file, with the weights dequantized by the `gguf` package (PyPI), not by our
kernels. Prints the greedy continuation of the given token ids and, per step,
the margin between the best and second-best logit (to explain any divergence).

    python3 tests/reference/llama_numpy.py MODEL.gguf --ids 1,2,3 --steps 16
"""
import argparse
import sys

import numpy as np
from gguf import GGUFReader, quants


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load(path):
    reader = GGUFReader(path)
    arch = field(reader, "general.architecture")
    cfg = {
        "dim": field(reader, f"{arch}.embedding_length"),
        "layers": field(reader, f"{arch}.block_count"),
        "heads": field(reader, f"{arch}.attention.head_count"),
        "kv_heads": field(reader, f"{arch}.attention.head_count_kv"),
        "theta": field(reader, f"{arch}.rope.freq_base", 10000.0),
        "eps": field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
    }
    weights = {}
    for t in reader.tensors:
        w = quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        weights[t.name] = w.reshape([int(d) for d in reversed(t.shape)])  # numpy order: (rows, cols)
    return cfg, weights


def rmsnorm(x, gamma, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gamma


def rope(x, heads, head_dim, theta):
    # Interleaved pairs (GGUF llama weights are permuted for this layout).
    n = x.shape[0]
    x = x.reshape(n, heads, head_dim // 2, 2)
    pos = np.arange(n)[:, None]
    freq = theta ** (-2.0 * np.arange(head_dim // 2) / head_dim)
    ang = pos * freq[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., 0], x[..., 1]
    out = np.stack([a * c - b * s, a * s + b * c], axis=-1)
    return out.reshape(n, heads * head_dim)


def forward(cfg, w, ids):
    d, H, G = cfg["dim"], cfg["heads"], cfg["kv_heads"]
    hd = d // H
    x = w["token_embd.weight"][ids]
    n = len(ids)
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for layer in range(cfg["layers"]):
        p = f"blk.{layer}."
        xn = rmsnorm(x, w[p + "attn_norm.weight"], cfg["eps"])
        q = rope(xn @ w[p + "attn_q.weight"].T, H, hd, cfg["theta"]).reshape(n, H, hd)
        k = rope(xn @ w[p + "attn_k.weight"].T, G, hd, cfg["theta"]).reshape(n, G, hd)
        v = (xn @ w[p + "attn_v.weight"].T).reshape(n, G, hd)
        out = np.zeros((n, H, hd))
        for h in range(H):
            g = h // (H // G)
            s = q[:, h, :] @ k[:, g, :].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
            out[:, h, :] = s @ v[:, g, :]
        x = x + out.reshape(n, d) @ w[p + "attn_output.weight"].T
        xn = rmsnorm(x, w[p + "ffn_norm.weight"], cfg["eps"])
        gate = xn @ w[p + "ffn_gate.weight"].T
        up = xn @ w[p + "ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
    x = rmsnorm(x[-1:], w["output_norm.weight"], cfg["eps"])
    head = w.get("output.weight", w["token_embd.weight"])
    return (x @ head.T)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    cfg, w = load(args.model)
    ids = [int(t) for t in args.ids.split(",")]
    for _ in range(args.steps):
        logits = forward(cfg, w, ids)
        order = np.argsort(-logits)
        print(f"{order[0]} {logits[order[0]] - logits[order[1]]:.4f}")
        sys.stdout.flush()
        ids.append(int(order[0]))


if __name__ == "__main__":
    main()
