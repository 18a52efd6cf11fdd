#!/usr/bin/env python3
"""Plots bench_batch's JSON: decode tokens/s against batch size, one line per
cache mode and one panel per context, and the capacity table as bars
(sequences held under one cache budget, and their tokens/s).

    python3 bench/plot_batch.py results.json out.png
"""
import json
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot_batch.py BENCH_BATCH.json OUT.png")
    with open(sys.argv[1]) as f:
        data = json.load(f)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({p["context"] for p in data["decode"]})
    modes = list(dict.fromkeys(p["mode"] for p in data["decode"]))
    panels = len(contexts) + (1 if data.get("capacity") else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        for mode in modes:
            pts = sorted((p["batch"], p["tokens_per_s"]) for p in data["decode"]
                         if p["mode"] == mode and p["context"] == context)
            ax.plot([b for b, _ in pts], [t for _, t in pts], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (sequences decoding together)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"context {context}")
        ax.grid(True, alpha=0.3)
        ax.legend()
    if data.get("capacity"):
        ax = axes[0][-1]
        cap = data["capacity"]
        names = [c["mode"] for c in cap]
        ax.bar(range(len(cap)), [c["sequences"] for c in cap], color="tab:blue")
        ax.set_xticks(range(len(cap)))
        ax.set_xticklabels(names, rotation=45, ha="right")
        ax.set_ylabel("sequences held", color="tab:blue")
        twin = ax.twinx()
        twin.plot(range(len(cap)), [c["tokens_per_s"] for c in cap], "o-", color="tab:red")
        twin.set_ylabel("decode tokens/s, all running", color="tab:red")
        ax.set_title(f"{data['capacity_mib']:.0f} MiB, {data['capacity_context']}-token sequences")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
