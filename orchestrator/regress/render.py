"""Text renderings shared by compare, regress and report: numbers, markdown tables, the regress summary.

Markdown is GitHub-flavoured (tables, `<details>`), so the regress summary reads well in a CI log
and as a pull-request comment.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from orchestrator.regress.stats import tail

if TYPE_CHECKING:
    from orchestrator.regress.check import Finding, PairCheck, RegressReport

MAX_LISTED = 50  # rows per markdown section before "... and N more"


def num(v: float | None) -> str:
    """A measured value with about four significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def pct(x: float | None, signed: bool = True) -> str:
    if x is None or math.isnan(x):
        return "—"
    if math.isinf(x):
        return "∞"
    return f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"


def md_escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A GitHub markdown table; `align` is one letter per column (l/r), default left then right."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(md_escape(h) for h in headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _z(z: float, critical: float) -> str:
    return ("∞" if math.isinf(z) else f"{z:+.1f}") + f" (±{critical:.1f})"


def finding_row(p: PairCheck, f: Finding) -> list[str]:
    c = f.change
    unit = "nights" if c.unit == "run" else "runs"
    base = f"{num(c.base_level)} ± {num(c.noise)} (n={c.baseline.n} {unit})"
    return [p.label, p.hardware_key, f"`{f.metric.name}` ({f.metric.better} is better)", base,
            f"{num(c.now_level)} (n={c.current.n})", pct(c.rel), f"≥ {pct(f.detectable, signed=False)}",
            _z(c.z, c.critical)]


FINDING_ALIGN = "lllrrrrr"
FINDING_HEADERS = ("config", "hardware", "metric", "baseline (level ± se)", "now", "change", "can detect",
                   "z (critical)")


def change_points_section(report: RegressReport) -> list[str]:
    """`--history`: where each checked metric's level changed over its pair's whole history."""
    labels = {(p.config_key, p.hardware_key): p.label for p in report.pairs}
    rows = [[labels.get(pair, pair[0]), pair[1], f"`{c.metric}`", f"{c.started_at:%Y-%m-%d}" if c.started_at else "—",
             c.suite_run_id, (c.commit or "several")[:10], f"{num(c.before)} → {num(c.after)}", pct(c.rel),
             "worse" if c.worse else "better", _z(c.z if c.worse else -c.z, c.critical)]
            for pair, cs in sorted(report.changes.items(), key=lambda kv: labels.get(kv[0], "")) for c in cs]
    head = ["", "### Change points over the whole history", ""]
    if not rows:
        return head + ["No change of level beyond the noise and the floors in any checked metric."]
    return head + [md_table(("config", "hardware", "metric", "from", "suite run", "commit", "level", "change",
                             "", "z (critical)"), rows, "llllllrrlr")]


def detectable_rows(report: RegressReport) -> list[list[str]]:
    """Per pair and metric: the smallest change the gate can flag there, and why (noise or floor)."""
    rows = []
    for p in report.pairs:
        for f in p.findings:
            s = f.change.spreads
            run = pct(s.run / abs(s.level), signed=False) if s and s.run and s.level else "—"
            night = pct(s.night / abs(s.level), signed=False) if s and s.level else "—"
            why = "noise" if f.change.mde >= f.threshold else "floor"
            rows.append([f"`{f.metric.name}` on {p.hardware_key.split('-')[0]} · {p.label}",
                         f"≥ {pct(f.detectable, signed=False)} ({why})", pct(f.change.mde, signed=False),
                         pct(f.threshold, signed=False), run, night, str(f.change.baseline.n)])
    return rows


def regress_markdown(report: RegressReport) -> str:
    """The summary `bench regress` prints: verdict first, then each kind of finding, then everything."""
    head = f"## bench regress · {report.suite or 'no suite'} · {report.suite_run_id or 'no suite run'}"
    if report.suite_run_id is None:
        return f"{head}\n\n**Not enough data:** the results dataset has no suite run to check.\n"
    regs, imps, noisy = (report.findings(v) for v in ("regression", "improvement", "noisy"))
    no_base = [p for p in report.pairs if p.status == "no-baseline"]
    checked = [p for p in report.pairs if p.status == "checked"]
    verdict = {0: "✅ no regression", 1: "❌ regression", 3: "⚠️ not enough data"}[report.exit_code]
    commits = ", ".join(c[:10] for c in report.commits) or "unknown"
    gate = report.gate
    out = [head, "",
           f"**{verdict}** — {len(regs)} regressed metrics, {len(report.failed_pairs)} failed configs, "
           f"{len(imps)} improvements; {len(checked)} of {len(report.pairs)} (config, hardware) pairs compared, "
           f"{len(no_base)} without baseline.", "",
           f"- commit: {commits}" + (f" · started {report.started_at:%Y-%m-%d %H:%M} UTC"
                                     if report.started_at else ""),
           f"- baseline: {report.baseline.describe()}, same config key and hardware key only",
           f"- rule: beyond the pair's noise **and** beyond the metric's practical floor, in its worse direction: "
           f"tonight's mean against the level of ≥ {gate.min_runs} baseline nights, over the standard error "
           f"their run-to-run and night-to-night spreads give, above the critical value calibrated for a "
           f"{tail(gate.z) * 100:.2g}% false-alarm rate per comparison (z = {gate.z:g})",
           f"- practical floors ({' < '.join(gate.sources)}): "
           + ", ".join(f"`{k}` {pct(v, signed=False)}" for k, v in gate.thresholds.items())]
    sections = [("Regressions", regs), ("Improvements", imps),
                ("Beyond the threshold but within the noise (not flagged)", noisy)]
    for title, items in sections:
        if items:
            rows = [finding_row(p, f) for p, f in items[:MAX_LISTED]]
            out += ["", f"### {title}", "", md_table(FINDING_HEADERS, rows, FINDING_ALIGN)]
            out += [f"\n… and {len(items) - MAX_LISTED} more"] if len(items) > MAX_LISTED else []
    if report.failed_pairs:
        out += ["", "### Failed in every repeat (ran in the baseline)", "",
                md_table(("config", "hardware", "failed runs", "error"),
                         [(p.label, p.hardware_key, p.n_failed, "; ".join(p.errors)) for p in report.failed_pairs])]
    others = [p for p in report.pairs if p.errors and p.status != "failed"]
    if others or report.unkeyed_failures:
        rows = [(p.label, p.hardware_key, p.n_failed, "; ".join(p.errors)) for p in others]
        rows += [(r["run_id"], "(no host)", 1, r["error"] or "") for r in report.unkeyed_failures]
        out += ["", "### Other failed runs", "", md_table(("config / run", "hardware", "failed runs", "error"), rows)]
    if no_base:
        out += ["", "### No baseline (not compared)", "",
                md_table(("config", "hardware", "runs now", "baseline nights", "needs"),
                         [(p.label, p.hardware_key, p.n_ok, len(p.baseline_runs),
                           f"{p.needs} more night(s)" if p.needs else "—") for p in no_base])]
    if report.changes is not None:
        out += change_points_section(report)
    seen = detectable_rows(report)
    if seen:
        out += ["", "### What the gate can see", "",
                "The smallest change each comparison flags (half the time at that size): the larger of the "
                "noise's (critical × standard error) and the metric's floor; run and night are the spreads "
                "the history shows, as a share of the level.", "",
                "<details><summary>minimum detectable effect per metric and pair</summary>", "",
                md_table(("metric on hardware · config", "can detect", "noise alone", "floor", "run-to-run",
                          "night-to-night", "nights"), seen, "llrrrrr"), "", "</details>"]
    every = [(p, f) for p in checked for f in p.findings]
    if every:
        out += ["", f"<details><summary>All {len(every)} comparisons</summary>", "",
                md_table((*FINDING_HEADERS, "verdict"), [[*finding_row(p, f), f.verdict] for p, f in every],
                         FINDING_ALIGN + "l"),
                "", "</details>"]
    return "\n".join(out) + "\n"
