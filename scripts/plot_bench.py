#!/usr/bin/env python3
"""Bar chart of a `snapmla bench --json` result: µs per decode call for each
config, snapmla bf16 and fp8 beside FlashMLA's measured bf16 (and fp8-sparse)
times from the anchor table.

usage: plot_bench.py BENCH.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    configs = []
    by_config = {}
    for row in data["rows"]:
        if row["config"] not in by_config:
            configs.append(row["config"])
            by_config[row["config"]] = {}
        by_config[row["config"]][row["format"]] = row
    series = [("FlashMLA bf16", lambda r: r.get("bf16", r.get("fp8", {})).get("flashmla_bf16_us") or None),
              ("snapmla bf16", lambda r: r.get("bf16", {}).get("us")),
              ("snapmla fp8", lambda r: r.get("fp8", {}).get("us"))]
    width = 0.27
    fig, ax = plt.subplots(figsize=(12, 4.5))
    for i, (label, get) in enumerate(series):
        xs, ys = [], []
        for j, c in enumerate(configs):
            v = get(by_config[c])
            if v:
                xs.append(j + (i - 1) * width)
                ys.append(v)
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([c.replace("_", "\n") for c in configs], fontsize=7)
    ax.set_ylabel("µs per decode call (lower is better)")
    ax.set_title(f"MLA decode on {data['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
