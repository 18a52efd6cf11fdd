#!/usr/bin/env python3
"""Our version of the paper's Table 4: perplexity and memory (fraction of the
fp16 KV cache) for every cache mode, from `xq perplexity`, plus a Pareto plot
(memory fraction against perplexity, one marker per mode family).
The modes are the table's (`xq modes --names`) unless --modes names some.
A mode written MODE@joint runs with --k-latent joint (xquant on GQA models:
the paper's single SVD of Wk instead of one per KV head).

    python3 bench/accuracy_table.py --model M --file TEXT --ctx 256 [--chunks N] [--plot out.png]
"""
import argparse
import re
import subprocess
import sys


def table_modes(xq):
    """Every cache mode, in the order of the table in runtime/cache_mode.h."""
    out = subprocess.run([xq, "modes", "--names"], check=True, capture_output=True, text=True).stdout
    return out.split()


def run(xq, model, text, ctx, chunks, threads, mode):
    name, _, variant = mode.partition("@")
    cmd = [xq, "perplexity", "--model", model, "--file", text, "--ctx", str(ctx), "--chunks", str(chunks),
           "--threads", str(threads), "--cache", name]
    if variant == "joint":
        cmd += ["--k-latent", "joint"]
    elif variant:
        raise SystemExit(f"unknown variant '{variant}' in {mode}")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    ppl = re.search(r"perplexity ([0-9.]+) \+/- ([0-9.]+)", out)
    mem = re.search(r"of the fp16 KV cache", out) and re.search(r"([0-9.]+) of the fp16 KV cache", out)
    return float(ppl.group(1)), float(ppl.group(2)), float(mem.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--xq", default="build/launch/xq")
    ap.add_argument("--model", required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", help="comma-separated (default: every mode `xq modes` lists)")
    ap.add_argument("--plot", help="write a Pareto plot (PNG) here")
    args = ap.parse_args()
    print("command: " + " ".join(sys.argv))
    rows = []
    print("| mode | memory (fraction of fp16 KV) | perplexity | vs fp16 |")
    print("|---|---|---|---|")
    base = None
    modes = args.modes.split(",") if args.modes else table_modes(args.xq)
    for mode in modes:
        ppl, err, mem = run(args.xq, args.model, args.file, args.ctx, args.chunks, args.threads, mode)
        base = base or ppl
        rows.append((mode, mem, ppl))
        print(f"| {mode} | {mem:.3f} | {ppl:.4f} ± {err:.4f} | {100 * (ppl / base - 1):+.2f}% |", flush=True)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        families = {"fp16": "s", "kivi": "o", "xquant": "^", "xquant@joint": "v", "xquant-cl": "D"}

        def family_of(n):
            name, _, variant = n.partition("@")
            base = name if name == "fp16" else name.rsplit("-", 1)[0]
            return base + ("@" + variant if variant else "")

        for family, marker in families.items():
            pts = [(m, p, n.partition("@")[0]) for n, m, p in rows if family_of(n) == family]
            if pts:
                ax.plot([m for m, _, _ in pts], [p for _, p, _ in pts], marker=marker, linestyle="-", label=family)
                for m, p, n in pts:
                    ax.annotate(n.rsplit("-", 1)[-1] if n != "fp16" else "", (m, p), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("cache memory (fraction of fp16 KV)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{args.model.split('/')[-1]}, ctx {args.ctx}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
