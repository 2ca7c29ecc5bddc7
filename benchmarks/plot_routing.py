"""Plot the routing benchmark results (benchmarks/results/*.json) into one PNG, and print them as
the markdown tables in benchmarks/README.md.

    .venv/bin/python benchmarks/plot_routing.py --out benchmarks/routing.png --markdown

Rows: one per result file; columns: TTFT p90, output tokens/s and prefix hit rate against the
offered rate, one line per policy (the hit-rate panel adds the upper bound).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LABELS = {
    "round_robin": "round-robin",
    "power_of_two": "power-of-two",
    "ray": "Ray PrefixCacheAffinityRouter",
    "ray_prefix_cache_affinity": "Ray PrefixCacheAffinityRouter",
    "prefix_aware": "ours (prefix_aware)",
}
DEFAULT_FILES = [
    "sim-x8-shared-prefix", "sim-x32-shared-prefix", "sim-x128-shared-prefix", "sim-x8-multi-turn",
    "sim-x8-shared-prefix-tight", "sim-x8-low-cache", "live-x8-shared-prefix",
]


def markdown(name: str, rows: list[dict]) -> str:
    lines = [f"{name}:", "",
             "| rate | policy | TTFT p50 | TTFT p90 | TTFT p99 | e2e p50 | output tok/s | hit rate (bound) | spread |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["rate"], list(LABELS).index(r["policy"]))):
        bound = f" ({r['hit_upper_bound']:.3f})" if "hit_upper_bound" in r else ""
        policy = LABELS.get(r["policy"], r["policy"])
        if r["policy"] == "prefix_aware":
            policy = f"**{policy}**"
        lines.append(f"| {r['rate']:g} | {policy} | {r['ttft_p50']:.3f} s | {r['ttft_p90']:.3f} s | "
                     f"{r['ttft_p99']:.3f} s | {r['e2e_p50']:.2f} s | {r['output_tok_s']:,.0f} | "
                     f"{r['hit_rate']:.3f}{bound} | {r['spread_max_over_mean']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--files", default=",".join(DEFAULT_FILES), help="result names, without .json")
    p.add_argument("--out", default="benchmarks/routing.png")
    p.add_argument("--markdown", action="store_true", help="also print each result file as a table")
    a = p.parse_args()
    runs = [(n, json.loads((Path(a.results) / f"{n}.json").read_text()))
            for n in a.files.split(",") if (Path(a.results) / f"{n}.json").exists()]
    fig, axes = plt.subplots(len(runs), 3, figsize=(15, 3.4 * len(runs)), squeeze=False)
    for row, (name, rows) in enumerate(runs):
        policies = list(dict.fromkeys(r["policy"] for r in rows))
        for policy in policies:
            mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["rate"])
            rates = [r["rate"] for r in mine]
            label = LABELS.get(policy, policy)
            axes[row][0].plot(rates, [r["ttft_p90"] for r in mine], marker="o", label=label)
            axes[row][1].plot(rates, [r["output_tok_s"] for r in mine], marker="o", label=label)
            axes[row][2].plot(rates, [r["hit_rate"] for r in mine], marker="o", label=label)
        bound = sorted({(r["rate"], r["hit_upper_bound"]) for r in rows if "hit_upper_bound" in r})
        if bound:
            axes[row][2].plot([b[0] for b in bound], [b[1] for b in bound], "k--", label="upper bound")
        unit = "conversations/s" if "multi-turn" in name else "requests/s"
        for col, title in enumerate(("TTFT p90 (s, log)", "output tokens/s", "prefix hit rate")):
            ax = axes[row][col]
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.set_xlabel(f"offered rate ({unit})", fontsize=8)
            ax.grid(alpha=0.3)
        axes[row][0].set_yscale("log")
        axes[row][2].set_ylim(0, 1)
        axes[row][2].legend(fontsize=7, loc="lower left")
    if a.markdown:
        for name, rows in runs:
            print(markdown(name, rows))
    fig.tight_layout()
    fig.savefig(a.out, dpi=80)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
