"""CoLD's evidence grid as one picture: each variant's accuracy gain over adapter greedy, with its
paired bootstrap 95% CI, for every `decalign eval-task` run folder given.

    python scripts/cold_grid.py "arithmetic, 20 steps=runs/e20" "arithmetic, 130 steps=runs/e130" ... -o grid.png \
        [--rename "cold:alpha=0.1:beta=0.5->paper's rule"]

Each argument is LABEL=RUN_DIR (a folder holding eval-task's summary.json); rows are runs, one
marker per variant, so a user sees at a glance where a decoder helps, where it hurts and how sure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--rename", action="append", default=[], metavar="VARIANT->NAME",
                        help="show a variant under another name (e.g. what a default meant when the run was made)")
    args = parser.parse_args()
    names = dict(pair.split("->", 1) for pair in args.rename)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        if not label:
            parser.error(f"{spec!r}: give LABEL=RUN_DIR")
        summary = json.loads((Path(folder) / "summary.json").read_text())
        runs.append((label, {names.get(name, name): row["paired"] for name, row in summary["variants"].items()
                             if row["paired"] is not None and name != "base"}))
    variants = sorted({name for _, paired in runs for name in paired})
    fig, ax = plt.subplots(figsize=(8, 0.7 * len(runs) + 0.3 * len(variants) + 1.5))
    spacing = min(0.18, 0.8 / len(variants))  # one row's markers stay within its band
    offsets = {name: (k - (len(variants) - 1) / 2) * spacing for k, name in enumerate(variants)}
    for row, (label, paired) in enumerate(runs):
        for name, figures in paired.items():
            y = row + offsets[name]
            low, high = figures["ci95"]
            ax.errorbar(100 * figures["diff"], y, xerr=[[100 * (figures["diff"] - low)], [100 * (high - figures["diff"])]],
                        fmt="o", capsize=3, color=f"C{variants.index(name)}",
                        label=name if row == 0 or name not in runs[0][1] else None)
    ax.axvline(0, color="grey", linewidth=1)
    ax.set_yticks(range(len(runs)), [label for label, _ in runs])
    ax.invert_yaxis()
    ax.set_xlabel("accuracy minus adapter greedy's (points), paired bootstrap 95% CI")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
