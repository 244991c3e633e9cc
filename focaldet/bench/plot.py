"""The ratios of a benchmark run as a bar chart, each case against its target."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def plot_ratios(results: dict[str, dict[str, float]], path: str | os.PathLike, targets: Mapping[str, float],
                title: str = "") -> Path:
    """Save the ratios as a bar chart (log scale) with each case's target marked: green bars
    meet it, red bars miss it."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    cases = list(results)[::-1]  # first case on top
    ratios = [results[c]["ratio"] for c in cases]
    targets = [targets.get(c, 1.0) for c in cases]
    fig = Figure(figsize=(7, 1.2 + 0.45 * len(cases)), dpi=120, layout="constrained")
    ax = fig.subplots()
    ax.barh(cases, ratios, color=["tab:green" if r >= t else "tab:red" for r, t in zip(ratios, targets)])
    ax.scatter(targets, cases, marker="|", s=400, color="black", zorder=3, label="target")
    for i, r in enumerate(ratios):
        ax.annotate(f"{r:.2f}x", (r, i), xytext=(4, 0), textcoords="offset points", va="center")
    ax.axvline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlim(min(0.1, *ratios) * 0.8, max(*ratios, *targets) * 2)
    ax.set_xlabel("torchvision / focaldet (data: pipeline / decode limit); > 1 favours focaldet")
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(title or "focaldet vs torchvision RetinaNet", fontsize="medium")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
