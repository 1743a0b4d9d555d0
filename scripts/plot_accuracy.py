#!/usr/bin/env python3
"""Draws docs/accuracy.png from the JSON `snapmla accuracy --json` writes and,
with --markdown, rewrites the results tables of docs/accuracy.md between
<!-- results:begin --> and <!-- results:end -->."""
import argparse
import json
import math
import re
import sys

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
REFERENCE_SCHEME = "snapmla-fp8"
# Fixed colours so the same scheme looks the same in every panel.
STYLE = {
    "bf16": ("#7f7f7f", ":"),
    "fp8-per-tensor-576": ("#d62728", "--"),
    "fp8-per-token-576": ("#ff7f0e", "--"),
    "fp8-per-tile-pow2": ("#2ca02c", "-."),
    "snapmla-fp8": ("#1f77b4", "-"),
    "snapmla-fp8+fp8-query": ("#8c564b", "--"),
    "snapmla-fp8+fp8-compute": ("#9467bd", "-"),
    "snapmla-fp8 GPU kernel": ("#17becf", "-"),
}


def load(path):
    with open(path) as f:
        return json.load(f)


def ordered(values):
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def scheme_names(data):
    return ordered(s["name"] for c in data["cases"] for s in c["schemes"])


def metric(case, name, key):
    for s in case["schemes"]:
        if s["name"] == name:
            return s.get(key)
    return None


def plot(data, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists = ordered(c["distribution"] for c in data["cases"])
    names = scheme_names(data)
    rows = [
        ("rel_l2", "output rel. L2 error", True),
        ("max_abs_lse", "max |lse error|", True),
        ("topk_overlap_mean", "top-k overlap (mean)", False),
    ]
    fig, axes = plt.subplots(len(rows), len(dists), figsize=(3.6 * len(dists), 9), squeeze=False, sharex=True)
    for col, dist in enumerate(dists):
        cases = sorted((c for c in data["cases"] if c["distribution"] == dist), key=lambda c: c["seq_len"])
        lengths = [c["seq_len"] for c in cases]
        for row, (key, label, log) in enumerate(rows):
            ax = axes[row][col]
            for name in names:
                ys = [metric(c, name, key) for c in cases]
                pts = [(x, y) for x, y in zip(lengths, ys) if y is not None and (not log or y > 0)]
                if not pts:
                    continue  # bf16 is exact on bf16 inputs: nothing to draw on a log axis
                colour, dash = STYLE.get(name, ("black", "-"))
                ax.plot(*zip(*pts), dash, marker="o", ms=3, color=colour, label=name,
                        lw=2.2 if name == REFERENCE_SCHEME else 1.3)
            ax.set_xscale("log", base=2)
            if log:
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if row == 0:
                ax.set_title(dist)
            if col == 0:
                ax.set_ylabel(label)
            if row == len(rows) - 1:
                ax.set_xlabel("cached tokens s_k")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    cfg = data["config"]
    fig.suptitle(f"KV-cache schemes vs float64 reference on unquantized inputs "
                 f"(batch {cfg['batch']}, h_q {cfg['h_q']}, base seed {cfg['base_seed']})")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    fig.savefig(png, dpi=110)


def fmt(x, digits=2):
    if x is None:
        return "n/a"
    if x == 0:
        return "0"
    return f"{x:.{digits}e}"


def table(data, key, cell):
    names = scheme_names(data)
    lines = ["| distribution | s_k | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for c in data["cases"]:
        cells = []
        for n in names:
            s = next((s for s in c["schemes"] if s["name"] == n), None)
            cells.append("failed" if s is not None and "failure" in s else cell(s) if s else "")
        lines.append(f"| {c['distribution']} | {c['seq_len']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def geomean(xs):
    xs = [x for x in xs if x is not None and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def ratio_table(data):
    """Geometric mean over lengths of (scheme's metric / snapmla-fp8's)."""
    names = [n for n in scheme_names(data) if n not in ("bf16", REFERENCE_SCHEME)]
    dists = ordered(c["distribution"] for c in data["cases"])
    lines = ["| distribution | metric | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for dist in dists:
        cases = [c for c in data["cases"] if c["distribution"] == dist]
        for key, label, transform in (
            ("rel_l2", "output rel. L2", lambda v: v),
            ("max_abs_lse", "max lse error", lambda v: v),
            ("topk_overlap_mean", "top-k misses (1 - overlap)", lambda v: None if v is None else 1 - v),
        ):
            cells = []
            for n in names:
                ratios = []
                for c in cases:
                    a, b = transform(metric(c, n, key)), transform(metric(c, REFERENCE_SCHEME, key))
                    if a is not None and b:
                        ratios.append(a / b)
                g = geomean(ratios)
                cells.append("n/a" if g is None else f"{g:.2f}x")
            lines.append(f"| {dist} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_markdown(data):
    cfg = data["config"]
    seeds = ", ".join(f"{c['distribution']}/{c['seq_len']}: {c['seed']}" for c in data["cases"])
    bytes_line = ", ".join(
        f"{n} {next(s['bytes_per_token'] for c in data['cases'] for s in c['schemes'] if s['name'] == n)} B"
        for n in scheme_names(data))
    parts = [
        f"Generated by `scripts/accuracy.sh` (snapmla {data['snapmla_version']}): batch {cfg['batch']}, "
        f"h_q {cfg['h_q']}, s_q 1, GPU kernel measured: {'yes' if cfg['gpu'] else 'no'}; "
        f"the run took {data['seconds']:.0f} s. Seeds (distribution/s_k: seed): {seeds}.",
        "",
        f"Bytes per cached token: {bytes_line}.",
        "",
        "![accuracy plot](accuracy.png)",
        "",
        "**Ratio to the snapmla format** (geometric mean over the context lengths; above 1x means the scheme is "
        "worse than snapmla-fp8 by that factor):",
        "",
        ratio_table(data),
        "",
        "**Output relative L2 error** (||out - ref|| / ||ref||):",
        "",
        table(data, "rel_l2", lambda s: fmt(s.get("rel_l2"))),
        "",
        "**Max |lse error|** (natural log units):",
        "",
        table(data, "max_abs_lse", lambda s: fmt(s.get("max_abs_lse"))),
        "",
        "**1 - cosine similarity** of the outputs:",
        "",
        table(data, "cosine", lambda s: fmt(None if s.get("cosine") is None else 1 - s["cosine"])),
        "",
        f"**Top-k overlap** with the reference's attended tokens, mean / worst row "
        f"(k = {cfg['top_k_rule']}):",
        "",
        table(data, "topk_overlap_mean",
              lambda s: "n/a" if s.get("topk_overlap_mean") is None
              else f"{s['topk_overlap_mean']:.3f} / {s['topk_overlap_min']:.3f}"),
    ]
    return "\n".join(parts)


def rewrite_markdown(path, body):
    with open(path) as f:
        text = f.read()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        sys.exit(f"{path}: no {BEGIN} ... {END} markers")
    text = pattern.sub(lambda _: f"{BEGIN}\n{body}\n{END}", text)
    with open(path, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("json")
    ap.add_argument("--png", default="docs/accuracy.png")
    ap.add_argument("--markdown", help="rewrite the results section of this file")
    args = ap.parse_args()
    data = load(args.json)
    plot(data, args.png)
    print(f"wrote {args.png}")
    if args.markdown:
        rewrite_markdown(args.markdown, results_markdown(data))
        print(f"rewrote the results in {args.markdown}")


if __name__ == "__main__":
    main()
