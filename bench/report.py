"""Percentiles, text tables and PNG plots shared by the benchmarks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def pct(values: Sequence[float], q: float) -> float | None:
    """Percentile ``q`` (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def fmt(v: Any, digits: int = 0, scale: float = 1.0, suffix: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v * scale:,.{digits}f}{suffix}"


def table(rows: list[list[str]], header: list[str], align_left: int = 2) -> str:
    """A plain fixed-width table (first ``align_left`` columns left-aligned, the rest right-aligned)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < align_left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def markdown_table(rows: list[list[str]], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def plot_quality(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """TTFT CDF per target (one panel per workload) and prefix-cache hit rate per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    targets = list(dict.fromkeys(r["target"] for r in runs))
    colors = {t: plt.get_cmap("tab10")(i) for i, t in enumerate(targets)}
    paths = []

    cols = min(2, len(workloads))
    rows = math.ceil(len(workloads) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), squeeze=False)
    for ax, wl in zip(axes.flat, workloads, strict=False):
        for r in runs:
            if r["workload"] != wl:
                continue
            ttfts = sorted(x["ttft"] * 1000 for x in r["requests"] if x["ttft"] is not None and x["measured"])
            if not ttfts:
                continue
            ys = [(i + 1) / len(ttfts) for i in range(len(ttfts))]
            ax.step(ttfts, ys, where="post", label=r["target"], color=colors[r["target"]])
        ax.set_xscale("log")
        ax.set_title(f"{wl}: TTFT CDF")
        ax.set_xlabel("time to first token (ms, log)")
        ax.set_ylabel("fraction of requests")
        ax.axhline(0.9, color="grey", lw=0.5, ls=":")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(workloads):]:
        ax.set_visible(False)
    fig.tight_layout()
    p = out_dir / "ttft_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(workloads)) + 2.5, 4.2))
    width = 0.8 / max(len(targets), 1)
    for j, t in enumerate(targets):
        xs, hs = [], []
        for i, wl in enumerate(workloads):
            for r in runs:
                if r["workload"] == wl and r["target"] == t and r["summary"]["hit_rate"] is not None:
                    xs.append(i + (j - (len(targets) - 1) / 2) * width)
                    hs.append(100 * r["summary"]["hit_rate"])
        bars = ax.bar(xs, hs, width, label=t, color=colors[t])
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("prefix-cache hit rate (%, pods' counters)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    p = out_dir / "hit_rate.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths
