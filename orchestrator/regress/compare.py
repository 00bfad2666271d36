"""`bench compare`: one table per metric, configs as rows and hosts (or commits) as columns.

A cell summarises the successful repeats of one config on one hardware key (or at one commit): the
median, the robust spread (orchestrator.stats, as a % of the median) and n, plus the ratio of its
median to the reference column's (default: the first column; for commits, the oldest). With
`by="commit"` a row is a (config, hardware) pair, so two commits are compared on the same hardware.
Rendering: rich tables for a terminal, markdown, CSV and JSON (one record per cell, long format).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from rich.table import Table
from rich.text import Text

from orchestrator.regress.metrics import DEFAULT_COMPARE, Metric, metric
from orchestrator.regress.render import md_table, num
from orchestrator.regress.stats import Summary, summarize
from orchestrator.results.query import HardwareInfo, config_labels, hardware_info, host_matches, short_commit
from worker.errors import UserError

By = Literal["hardware", "commit"]
RowKey = tuple[str, str | None]  # (config_key, hardware_key when columns are commits)


@dataclass(frozen=True)
class Cell:
    summary: Summary
    ratio: float | None  # median / the reference column's median in the same row


@dataclass
class MetricTable:
    metric: Metric
    columns: list[str]
    rows: list[RowKey]
    labels: dict[RowKey, str]
    cells: dict[tuple[RowKey, str], Cell]
    ref: str | None


@dataclass
class Comparison:
    by: By
    selection: str
    tables: list[MetricTable]
    column_labels: dict[str, str]
    hardware: dict[str, HardwareInfo]
    n_ok: int
    n_failed: int
    config_labels: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        """One record per cell (CSV / JSON)."""
        out = []
        for t in self.tables:
            for row in t.rows:
                for col in t.columns:
                    cell = t.cells.get((row, col))
                    if cell is None:
                        continue
                    s = cell.summary
                    out.append({"metric": t.metric.name, "better": t.metric.better, "config_key": row[0],
                                "config": self.config_labels.get(row[0], row[0]),
                                "hardware_key": row[1] if self.by == "commit" else col,
                                "commit": col if self.by == "commit" else None, "median": s.median,
                                "sigma": s.sigma, "spread": s.spread, "n": s.n, "min": s.lo, "max": s.hi,
                                "reference": t.ref, "ratio": cell.ratio})
        return out


def compare(rows: list[dict[str, Any]], metrics: Sequence[str] = DEFAULT_COMPARE, by: By = "hardware",
            ref: str | None = None, selection: str = "") -> Comparison:
    """Tables of the ok rows in `rows`, one per metric (unknown metrics are a UserError)."""
    chosen = [metric(m) for m in metrics]
    ok = [r for r in rows if r["status"] == "ok" and r["hardware_key"]]
    labels = config_labels(rows)
    hw = hardware_info(rows)
    column_of = (lambda r: r["hardware_key"]) if by == "hardware" else (lambda r: r["git_commit"] or "unknown")
    if by == "hardware":
        row_of = lambda r: (r["config_key"], None)  # noqa: E731
    else:
        row_of = lambda r: (r["config_key"], r["hardware_key"])  # noqa: E731
    columns = _columns(ok, by, hw, column_of)
    column_labels = {c: (c if by == "hardware" else short_commit(c)) for c in columns}
    ref_col = resolve_ref(ref, columns, by, ok) if ref else (columns[0] if len(columns) > 1 else None)
    groups: dict[tuple[RowKey, str], list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        groups[(row_of(r), column_of(r))].append(r)
    row_keys = sorted({k for k, _ in groups}, key=lambda k: (labels.get(k[0], k[0]), k[1] or ""))
    row_labels = {k: labels.get(k[0], k[0]) + (f" @ {k[1]}" if k[1] else "") for k in row_keys}
    tables = []
    for m in chosen:
        cells: dict[tuple[RowKey, str], Cell] = {}
        for row in row_keys:
            summaries = {c: summarize([r[m.name] for r in groups.get((row, c), [])]) for c in columns}
            base = summaries.get(ref_col) if ref_col else None
            for c, s in summaries.items():
                if s is not None:
                    ratio = s.median / base.median if base is not None and base.median else None
                    cells[(row, c)] = Cell(s, ratio)
        tables.append(MetricTable(m, columns, row_keys, row_labels, cells, ref_col))
    notes = []
    if by == "hardware":
        commits = sorted({r["git_commit"] for r in ok if r["git_commit"]})
        if len(commits) > 1:
            notes.append(f"{len(commits)} commits pooled in each cell; `--by commit` puts them side by side")
    return Comparison(by, selection, tables, column_labels, hw, len(ok), sum(r["status"] != "ok" for r in rows), labels,
                      notes)


def resolve_ref(ref: str, columns: list[str], by: By, rows: list[dict[str, Any]]) -> str:
    """The column `ref` names: a hardware key (or prefix), a host name or GPU model; or a commit prefix."""
    if ref in columns:
        return ref
    found = [c for c in columns if c.startswith(ref)]
    if by == "hardware" and not found:
        found = sorted({r["hardware_key"] for r in rows if host_matches(ref, r)} & set(columns))
    if len(found) == 1:
        return found[0]
    what = "hardware keys" if by == "hardware" else "commits"
    why = "matches several" if found else "matches none"
    raise UserError(f"--ref {ref!r} {why} of the {what} compared: {', '.join(found or columns) or 'none'}")


def _columns(ok: list[dict[str, Any]], by: By, hw: dict[str, HardwareInfo], column_of) -> list[str]:
    present = {column_of(r) for r in ok}
    if by == "hardware":
        return [k for k in hw if k in present]
    first: dict[str, Any] = {}
    for r in ok:
        t = r["finished_at"] or r["started_at"]
        c = column_of(r)
        if t is not None and (c not in first or t < first[c]):
            first[c] = t
    return sorted(present, key=lambda c: (first.get(c) is None, first.get(c) or 0, c))


def cell_text(cell: Cell | None, is_ref: bool) -> str:
    if cell is None:
        return "—"
    s = cell.summary
    text = f"{num(s.median)} ±{s.spread * 100:.1f}% n={s.n}"
    if cell.ratio is not None and not is_ref:
        text += f" ×{cell.ratio:.2f}"
    return text


def title(t: MetricTable, comp: Comparison) -> str:
    ref = f" · ratios to {comp.column_labels[t.ref]}" if t.ref else ""
    return f"{t.metric.name}: {t.metric.describe()}{ref}"


def to_rich(comp: Comparison) -> list[Table]:
    out = []
    for t in comp.tables:
        table = Table(title=title(t, comp), title_justify="left")
        table.add_column("config" if comp.by == "hardware" else "config @ hardware", overflow="fold")
        for c in t.columns:
            table.add_column(comp.column_labels[c] + (" (ref)" if c == t.ref else ""), justify="right",
                             overflow="fold")
        for row in t.rows:
            table.add_row(Text(t.labels[row]), *(cell_text(t.cells.get((row, c)), c == t.ref) for c in t.columns))
        out.append(table)
    return out


def to_markdown(comp: Comparison) -> str:
    parts = [f"## bench compare · {comp.selection or 'all runs'} · {comp.n_ok} ok runs, {comp.n_failed} failed", ""]
    parts += [f"_{n}_" for n in comp.notes]
    for t in comp.tables:
        headers = ["config"] + [f"`{comp.column_labels[c]}`" + (" (ref)" if c == t.ref else "") for c in t.columns]
        rows = [[t.labels[r], *(cell_text(t.cells.get((r, c)), c == t.ref) for c in t.columns)] for r in t.rows]
        parts += ["", f"### {title(t, comp)}", "", md_table(headers, rows)]
    if comp.by == "hardware" and comp.hardware:
        parts += ["", "### Hardware", "", md_table(["hardware key", "what", "probe SSD / H2D GB/s"], [
            [f"`{k}`", h.describe(), " / ".join(num(h.probe[p]) for p in ("probe_ssd_gbps", "probe_h2d_gbps"))]
            for k, h in comp.hardware.items()], "lll")]
    return "\n".join(parts) + "\n"


def to_csv(comp: Comparison) -> str:
    buf = io.StringIO()
    records = comp.records()
    fields = list(records[0]) if records else ["metric", "config_key", "config", "hardware_key", "commit", "median",
                                               "sigma", "spread", "n", "min", "max", "reference", "ratio"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()
