"""The report's figures, drawn with matplotlib's object API and returned as PNG data URIs.

No pyplot: figures are plain `Figure` objects (Agg), so nothing global changes in the caller's
process and nothing needs a display. Every function takes summarised data, not rows, and draws one
figure; colours follow the hardware key's position so a host keeps its colour across figures.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Sequence

from matplotlib.figure import Figure

from orchestrator.regress.history import Series
from orchestrator.regress.stats import Summary

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
DPI = 100
MAX_PANELS = 12


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def grouped_bars(ax, labels: Sequence[str], series: dict[str, list[Summary | None]], hw_order: list[str],
                 xlabel: str, ref: float | None = None) -> None:
    """Horizontal bars: one group per label, one bar per hardware key; whiskers span min..max."""
    n = max(len(series), 1)
    height = 0.8 / n
    for j, (hw, values) in enumerate(series.items()):
        ys = [i + (j - (n - 1) / 2) * height for i in range(len(labels))]
        med = [v.median if v else 0.0 for v in values]
        err = [[v.median - v.lo if v else 0 for v in values], [v.hi - v.median if v else 0 for v in values]]
        ax.barh(ys, med, height=height * 0.9, xerr=err, color=color(hw_order.index(hw)), label=hw,
                error_kw={"elinewidth": 0.8, "capsize": 2})
    if ref is not None:
        ax.axvline(ref, color="#d62728", lw=1, ls="--")
        ax.set_xlim(0, max(ref * 1.08, ax.get_xlim()[1]))
    highs = [v.hi for vs in series.values() for v in vs if v and v.lo > 0]
    if ref is None and highs and max(highs) / min(v.lo for vs in series.values() for v in vs if v and v.lo > 0) > 20:
        ax.set_xscale("log")  # configs an order of magnitude apart: keep the slow ones visible
        xlabel += " (log scale)"
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)


def throughput(labels: list[str], tok_s: dict[str, list[Summary | None]], attain: dict[str, list[Summary | None]],
               hw_order: list[str]) -> str:
    """Decode tokens/s and attainment, per config (rows) and hardware (bars)."""
    fig = Figure(layout="constrained", figsize=(13, 1.2 + 0.16 * len(labels) * (1 + max(len(tok_s), 1))))
    ax1, ax2 = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})
    grouped_bars(ax1, labels, tok_s, hw_order, "decode throughput (tok/s, higher is better)")
    grouped_bars(ax2, labels, attain, hw_order, "decode attainment: floor / measured (1 = I/O floor)", ref=1.0)
    ax1.legend(fontsize=8, loc="lower right")
    return data_uri(fig)


def breakdown(labels: list[str], prefill: list[float], decode: list[float], ttft: list[float],
              colors: list[str]) -> str:
    """Share of end-to-end time in prefill and decode per (config, hardware); ms annotated."""
    fig = Figure(layout="constrained", figsize=(13, 1.0 + 0.28 * len(labels)))
    ax = fig.subplots()
    total = [p + d for p, d in zip(prefill, decode)]
    pf = [p / t if t else 0 for p, t in zip(prefill, total)]
    ys = range(len(labels))
    ax.barh(ys, pf, color="#4c72b0", label="prefill")
    ax.barh(ys, [1 - f for f in pf], left=pf, color="#dd8452", label="decode")
    for y, t, tt, p, d in zip(ys, total, ttft, prefill, decode):
        ax.text(1.01, y, f"e2e {t:,.0f} ms · TTFT {tt:,.1f} · prefill {p:,.1f} · decode {d:,.0f}", va="center",
                fontsize=7.5, transform=ax.get_yaxis_transform())
    ax.set_yticks(list(ys), labels, fontsize=7.5)
    for tick, c in zip(ax.get_yticklabels(), colors):
        tick.set_color(c)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of prefill + decode time (medians)")
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False)
    return data_uri(fig)


def io_vs_probe(channels: list[str], measured: dict[str, dict[str, list[float]]],
                probe: dict[str, dict[str, float | None]], hw_order: list[str]) -> str:
    """Per channel: every run's GB/s (dots) and the host's probe figure (red bar) per hardware key."""
    fig = Figure(layout="constrained", figsize=(13, 3.6))
    axes = fig.subplots(1, len(channels))
    for ax, ch in zip(axes, channels):
        for i, hw in enumerate(hw_order):
            vals = measured.get(ch, {}).get(hw, [])
            xs = [i + 0.25 * ((k % 7) - 3) / 3 for k in range(len(vals))]
            ax.scatter(xs, vals, s=12, color=color(i), alpha=0.8)
            limit = probe.get(ch, {}).get(hw)
            if limit is not None:
                ax.hlines(limit, i - 0.4, i + 0.4, color="#d62728", lw=2)
        ax.set_xticks(range(len(hw_order)), [h.split("-")[0] for h in hw_order], fontsize=8, rotation=30)
        ax.set_title(ch.removesuffix("_gbps").replace("_", " ") + " GB/s", fontsize=9)
        ax.set_xlim(-0.6, len(hw_order) - 0.4)
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("GB/s (dots: runs, red: probe)")
    return data_uri(fig)


def history(panels: list[tuple[str, list[Series]]], ylabel: str, hw_order: list[str], ticks: list[str]) -> str:
    """Small multiples, one per config: suite-run medians per hardware key, suite runs evenly spaced
    (`ticks` labels them), red ▼ where `bench regress` flagged a regression, green ▲ an improvement,
    a dashed line before the night a change point's new level begins (red worse, green better)."""
    panels = panels[:MAX_PANELS]
    cols = 3 if len(panels) > 4 else max(len(panels), 1)
    nrows = math.ceil(len(panels) / cols) or 1
    fig = Figure(figsize=(13, 0.85 + 2.5 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    step = max(1, math.ceil(len(ticks) / 8))
    for ax, (title, series) in zip(axes.flat, panels):
        for s in series:
            c = color(hw_order.index(s.hardware))
            ax.plot([t for t, _ in s.points], [v for _, v in s.points], marker="o", ms=3, lw=1.2, color=c,
                    label=s.hardware.split("-")[0])
            if s.regressions:
                ax.scatter(*zip(*s.regressions), marker="v", s=80, color="#d62728", zorder=5)
            if s.improvements:
                ax.scatter(*zip(*s.improvements), marker="^", s=80, color="#2ca02c", zorder=5)
            for t, worse in s.changes:  # a new level begins here
                ax.axvline(t - 0.5, color="#d62728" if worse else "#2ca02c", ls="--", lw=1, alpha=0.8)
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(0, len(ticks), step), ticks[::step], fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.set_ylabel(ylabel, fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
    fig.legend(list(handles.values()), list(handles), loc="upper right", ncol=len(handles), fontsize=8, frameon=False)
    height = 0.85 + 2.5 * nrows
    fig.subplots_adjust(left=0.06, right=0.99, top=1 - 0.6 / height, bottom=0.4 / height, hspace=0.45, wspace=0.22)
    return data_uri(fig)
