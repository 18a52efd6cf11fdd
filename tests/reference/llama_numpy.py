#!/usr/bin/env python3
"""An independent reference for the engine: a Llama forward pass in numpy over a
GGUF file (weights dequantized by the `gguf` package from PyPI, not by our
kernels) or a llama2.c checkpoint. Two jobs:

  greedy: the greedy continuation of the given token ids and, per step, the
  margin between the best and second-best logit (to explain any divergence);
      llama_numpy.py MODEL --ids 1,2,3 --steps 16
  perplexity: llama.cpp's protocol (chunks of CTX tokens, BOS first, second
  half scored) over token ids read from a file (one comma-separated line, as
  `xq tokenize` prints them);
      llama_numpy.py MODEL --perplexity IDS_FILE --ctx 256 [--chunks N]

With --int8-activations (what the engine does, and llama.cpp too), the input
of every product with a 32-block quantized weight (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q8_1) is first rounded per block of 32 as the engine's int8 path rounds
it: q = nearbyint(x * 127 / max|x|), value q * max|x| / 127. Everything else
stays in float64.
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


def load_llama2c(path):
    raw = np.fromfile(path, dtype=np.int32, count=7)
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = (int(v) for v in raw)
    floats = np.fromfile(path, dtype=np.float32, offset=28).astype(np.float64)
    hd = dim // heads
    kv = kv_heads * hd
    cfg = {"dim": dim, "layers": layers, "heads": heads, "kv_heads": kv_heads, "theta": 10000.0, "eps": 1e-5}
    at = 0

    def take(*shape):
        nonlocal at
        n = int(np.prod(shape))
        out = floats[at:at + n].reshape(shape)
        at += n
        return out
    w = {"token_embd.weight": take(abs(vocab), dim)}
    parts = [("attn_norm.weight", (dim,)), ("attn_q.weight", (dim, dim)), ("attn_k.weight", (kv, dim)),
             ("attn_v.weight", (kv, dim)), ("attn_output.weight", (dim, dim)), ("ffn_norm.weight", (dim,)),
             ("ffn_gate.weight", (hidden, dim)), ("ffn_down.weight", (dim, hidden)), ("ffn_up.weight", (hidden, dim))]
    for name, shape in parts:
        block = take(layers, *shape)
        for layer in range(layers):
            w[f"blk.{layer}.{name}"] = block[layer]
    w["output_norm.weight"] = take(dim)
    take(seq_len * hd)  # RoPE tables, recomputed here
    if vocab < 0:
        w["output.weight"] = take(-vocab, dim)
    return cfg, w


def load(path):
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return load_llama2c(path)
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
    block_quantized = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1"}
    cfg["int8_inputs"] = {t.name for t in reader.tensors if t.tensor_type.name in block_quantized}
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


def round_as_q8(x):
    n, cols = x.shape
    blocks = x.reshape(n, cols // 32, 32)
    top = np.abs(blocks).max(axis=2, keepdims=True)
    safe = np.where(top > 0, top, 1.0)
    return (np.rint(blocks * (127.0 / safe)) * (top / 127.0)).reshape(n, cols)


# x @ W.T, with x rounded first where the engine rounds it (see the top).
INT8_ACTIVATIONS = False


def mm(cfg, w, x, name):
    if INT8_ACTIVATIONS and name in cfg.get("int8_inputs", ()):
        x = round_as_q8(x)
    return x @ w[name].T


def forward(cfg, w, ids, all_rows=False):
    d, H, G = cfg["dim"], cfg["heads"], cfg["kv_heads"]
    hd = d // H
    x = w["token_embd.weight"][ids]
    n = len(ids)
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for layer in range(cfg["layers"]):
        p = f"blk.{layer}."
        xn = rmsnorm(x, w[p + "attn_norm.weight"], cfg["eps"])
        q = rope(mm(cfg, w, xn, p + "attn_q.weight"), H, hd, cfg["theta"]).reshape(n, H, hd)
        k = rope(mm(cfg, w, xn, p + "attn_k.weight"), G, hd, cfg["theta"]).reshape(n, G, hd)
        v = mm(cfg, w, xn, p + "attn_v.weight").reshape(n, G, hd)
        out = np.zeros((n, H, hd))
        for h in range(H):
            g = h // (H // G)
            s = q[:, h, :] @ k[:, g, :].T / np.sqrt(hd) + mask
            s = np.exp(s - s.max(axis=1, keepdims=True))
            s /= s.sum(axis=1, keepdims=True)
            out[:, h, :] = s @ v[:, g, :]
        x = x + mm(cfg, w, out.reshape(n, d), p + "attn_output.weight")
        xn = rmsnorm(x, w[p + "ffn_norm.weight"], cfg["eps"])
        gate = mm(cfg, w, xn, p + "ffn_gate.weight")
        up = mm(cfg, w, xn, p + "ffn_up.weight")
        x = x + mm(cfg, w, gate / (1 + np.exp(-gate)) * up, p + "ffn_down.weight")
    x = rmsnorm(x if all_rows else x[-1:], w["output_norm.weight"], cfg["eps"])
    logits = mm(cfg, w, x, "output.weight" if "output.weight" in w else "token_embd.weight")
    return logits if all_rows else logits[0]


def perplexity(cfg, w, ids, ctx, max_chunks, bos):
    chunks = len(ids) // ctx
    if max_chunks:
        chunks = min(chunks, max_chunks)
    nll = []
    first = ctx // 2
    for c in range(chunks):
        chunk = list(ids[c * ctx:(c + 1) * ctx])
        chunk[0] = bos
        logits = forward(cfg, w, chunk, all_rows=True)[first:ctx - 1]
        top = logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        targets = np.array(chunk[first + 1:ctx])
        nll.extend(logz - logits[np.arange(len(targets)), targets])
    nll = np.array(nll)
    ppl = np.exp(nll.mean())
    err = ppl * np.sqrt(nll.var() / (len(nll) - 1))
    print(f"perplexity {ppl:.4f} +/- {err:.4f} ({len(nll)} tokens scored in {chunks} chunks of {ctx})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--ids", help="comma-separated prompt token ids")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--perplexity", help="file with the text's token ids, comma-separated")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=0)
    ap.add_argument("--bos", type=int, default=1)
    ap.add_argument("--int8-activations", action="store_true",
                    help="round the inputs of block-quantized products as the engine does")
    args = ap.parse_args()
    global INT8_ACTIVATIONS
    INT8_ACTIVATIONS = args.int8_activations
    cfg, w = load(args.model)
    if args.perplexity:
        ids = [int(t) for t in open(args.perplexity).read().strip().split(",")]
        perplexity(cfg, w, ids, args.ctx, args.chunks, args.bos)
        return
    ids = [int(t) for t in args.ids.split(",")]
    for _ in range(args.steps):
        logits = forward(cfg, w, ids)
        order = np.argsort(-logits)
        print(f"{order[0]} {logits[order[0]] - logits[order[1]]:.4f}")
        sys.stdout.flush()
        ids.append(int(order[0]))


if __name__ == "__main__":
    main()
