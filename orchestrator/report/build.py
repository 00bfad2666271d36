"""`bench report`: one self-contained HTML file over the results dataset.

Everything is inline (CSS, PNG figures as data URIs, no script, no link), so the file opens offline
and can be mailed or attached to a CI run. Sections: the regression check of the newest suite run,
tokens/s and attainment per host and config, runs whose attainment beat their floor (`floor_suspect`),
the TTFT / prefill / decode breakdown, I/O bandwidth per channel against each host's probe figures,
history over nights with regression markers, failed runs with their errors, and the hardware. "Latest" sections show, for each (config, hardware) pair,
the rows of its newest suite run; history uses every selected row.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from markupsafe import Markup

from orchestrator.regress.check import Baseline, RegressReport, check, regress
from orchestrator.regress.compare import compare
from orchestrator.regress.gate import Gate
from orchestrator.regress.history import History, Series, collect_history
from orchestrator.regress.metrics import CHANNELS, METRICS
from orchestrator.regress.render import num, pct, regress_markdown
from orchestrator.regress.stats import summarize
from orchestrator.report import plots
from orchestrator.report.html import Column, render, section, table
from orchestrator.results.query import Selection, config_labels, hardware_info, newest_suite_run, select, short_commit
from orchestrator.results.store import default_uri
from worker.files import write_atomic
from worker.host.roofline import SUSPECT_ATTAINMENT

log = logging.getLogger(__name__)

BREAKDOWN_METRICS = ("ttft_ms", "prefill_ms", "decode_ms", "e2e_ms")


@dataclass(frozen=True)
class ReportInfo:
    path: str
    rows: int
    failed: int
    suite_runs: int
    exit_code: int | None  # the regression check of the newest suite run (None: no runs)


def build_report(uri: str | None, out: str | Path, sel: Selection = Selection(), *, gate: Gate = Gate(),
                 baseline: Baseline = Baseline(), title: str | None = None) -> ReportInfo:
    """Write the report for the rows of `uri` matching `sel` to `out` (temp file + rename)."""
    rows = select(uri, sel)
    newest = newest_suite_run(rows)
    check_now = None
    if newest and sel == Selection():  # the whole dataset is in hand: no second read
        check_now = check(rows, newest, baseline=baseline, gate=gate)
    elif newest:  # the baseline may lie outside the selection; the pairs checked may not
        check_now = regress(uri, suite_run_id=newest, baseline=baseline, gate=gate)
        keys = {(r["config_key"], r["hardware_key"]) for r in rows}
        check_now.pairs = [p for p in check_now.pairs if (p.config_key, p.hardware_key) in keys]
        run_ids = {r["run_id"] for r in rows if r["suite_run_id"] == newest}
        check_now.unkeyed_failures = [r for r in check_now.unkeyed_failures if r["run_id"] in run_ids]
    body = report_body(rows, check_now, gate=gate, baseline=baseline, uri=uri or default_uri(), sel=sel)
    page = render("page.html.j2", title=title or "streambench report", body=body,
                  generated=f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    out = write_atomic(out, page, "report")
    log.debug("wrote %s", out)
    failed = sum(r["status"] != "ok" for r in rows)
    return ReportInfo(str(out), len(rows), failed, len({r["suite_run_id"] for r in rows}),
                      check_now.exit_code if check_now else None)


def report_body(rows: list[dict[str, Any]], now: RegressReport | None, *, gate: Gate, baseline: Baseline, uri: str,
                sel: Selection) -> Markup:
    """The report's body (HTML) for `rows`."""
    if not rows:
        return render("no_runs.html.j2", selection=sel.describe(), uri=uri)
    labels = config_labels(rows)
    hw = hardware_info(rows)
    order = list(hw)
    latest = latest_rows(rows)
    parts = [overview(rows, now, uri, sel), regress_section(now)]
    parts.append(section("Throughput and attainment", "latest suite run of each config on each host; bars are "
                         "medians over repeats, whiskers min–max", throughput_figure(latest, labels, order),
                         compare_tables(latest, ("decode_tok_s", "attainment_decode"))))
    parts.append(suspect_section(rows, labels))
    parts.append(section("Latency breakdown: TTFT, prefill, decode", "medians of the latest suite run",
                         breakdown_figure(latest, labels, order), compare_tables(latest, BREAKDOWN_METRICS)))
    parts.append(section("I/O bandwidth against the host's probe", "every run of the latest suite runs; red: the "
                         "probe figure the roofline used (KV D2H is drawn against the H2D probe)",
                         io_figure(latest, order), io_table(latest, hw)))
    parts.append(history_section(collect_history(rows, labels, order, gate, baseline), labels, order, baseline))
    parts.append(failures_section(rows, labels))
    parts.append(section("Hardware", content=table(
        ["hardware key", "GPU", "NVMe", "CPU", "RAM GB", "hosts", "probe SSD / H2D / HBM GB/s"],
        [[k, h.gpu, h.nvme, h.cpu, num(h.ram_gb), ", ".join(h.hosts),
          " / ".join(num(h.probe[c]) for c in ("probe_ssd_gbps", "probe_h2d_gbps", "probe_hbm_gbps"))]
         for k, h in hw.items()])))
    parts.append(section("The data", content=render("dataset.html.j2", uri=uri, rows=len(rows),
                                                    selection=sel.describe())))
    return Markup("\n").join(parts)


def latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each (config, hardware) pair, the rows of its newest suite run."""
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["hardware_key"]:
            by_pair[(r["config_key"], r["hardware_key"])].append(r)
    out = []
    for pair_rows in by_pair.values():
        newest = newest_suite_run(pair_rows)
        out += [r for r in pair_rows if r["suite_run_id"] == newest]
    return out


def overview(rows: list[dict[str, Any]], now: RegressReport | None, uri: str, sel: Selection) -> Markup:
    times = [r["finished_at"] for r in rows if r["finished_at"]]
    commits = sorted({short_commit(r["git_commit"]) for r in rows if r["git_commit"]})
    failed = sum(r["status"] != "ok" for r in rows)
    verdict = {0: ("ok", "no regression"), 1: ("bad", "regression"), 3: ("warn", "not enough data")}
    cls, text = verdict[now.exit_code] if now else ("warn", "no suite run")
    cards = {"newest suite run": f"{now.suite_run_id}" if now else "—", "regression check": text,
             "runs": f"{len(rows)} ({failed} failed)", "suite runs": str(len({r["suite_run_id"] for r in rows})),
             "hosts": str(len({r["host"] for r in rows if r["host"]})),
             "from – to": f"{min(times):%Y-%m-%d} – {max(times):%Y-%m-%d}" if times else "—",
             "commits": ", ".join(commits[-3:]) + (f" (+{len(commits) - 3})" if len(commits) > 3 else "")}
    return render("overview.html.j2", cards=cards, css={"regression check": cls}, uri=uri, selection=sel.describe())


def regress_section(now: RegressReport | None) -> Markup:
    if now is None:
        return Markup()
    items = [(p, f) for v in ("regression", "improvement", "noisy") for p, f in now.findings(v)]
    rows = [[f.verdict, p.label, p.hardware_key, f.metric.name, num(f.change.baseline.median),
             num(f.change.current.median), pct(f.change.rel), f"{f.change.z:+.1f} / {f.change.critical:.1f}", ""]
            for p, f in items]
    rows += [["failed", p.label, p.hardware_key, f"all {p.n_failed} repeats", "", "", "", "",
              "; ".join(e.splitlines()[0][:100] for e in p.errors)] for p in now.failed_pairs]
    findings = table(["verdict", "config", "hardware", "metric", "baseline", "now", "change", "z / critical", "note"],
                     rows, row_class=lambda r: r[0], empty="No metric beyond its threshold.")
    return section(f"Regression check: {now.suite_run_id}", f"baseline: {now.baseline.describe()}; "
                   f"{len([p for p in now.pairs if p.status == 'checked'])} of {len(now.pairs)} pairs compared",
                   content=findings + render("summary.html.j2", markdown=regress_markdown(now)))


def per_pair(rows: list[dict[str, Any]], metric: str) -> dict[tuple[str, str], Any]:
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r["hardware_key"]:
            groups[(r["config_key"], r["hardware_key"])].append(r[metric])
    return {k: summarize(v) for k, v in groups.items()}


def throughput_figure(latest: list[dict[str, Any]], labels: dict[str, str], order: list[str]) -> str:
    tok, att = per_pair(latest, "decode_tok_s"), per_pair(latest, "attainment_decode")
    configs = [c for c in labels if any(k[0] == c and v for k, v in tok.items())]
    if not configs:
        return ""
    hws = [h for h in order if any(k[1] == h for k in tok)]
    return plots.throughput([labels[c] for c in configs], {h: [tok.get((c, h)) for c in configs] for h in hws},
                            {h: [att.get((c, h)) for c in configs] for h in hws}, order)


def breakdown_figure(latest: list[dict[str, Any]], labels: dict[str, str], order: list[str]) -> str:
    s = {m: per_pair(latest, m) for m in BREAKDOWN_METRICS}
    pairs = sorted((k for k, v in s["e2e_ms"].items() if v and s["prefill_ms"].get(k) and s["decode_ms"].get(k)),
                   key=lambda k: (labels.get(k[0], k[0]), order.index(k[1])))
    if not pairs:
        return ""
    med = lambda m, k: s[m][k].median if s[m].get(k) else 0.0  # noqa: E731
    return plots.breakdown([f"{labels.get(c, c)} @ {h.split('-')[0]}" for c, h in pairs],
                           [med("prefill_ms", k) for k in pairs], [med("decode_ms", k) for k in pairs],
                           [med("ttft_ms", k) for k in pairs], [plots.color(order.index(h)) for _, h in pairs])


def io_figure(latest: list[dict[str, Any]], order: list[str]) -> str:
    measured: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    probe: dict[str, dict[str, float | None]] = defaultdict(dict)
    for r in latest:
        if r["status"] != "ok" or not r["hardware_key"]:
            continue
        for ch, pc in CHANNELS:
            if r[ch] is not None:
                measured[ch][r["hardware_key"]].append(r[ch])
            if r[pc] is not None:
                probe[ch][r["hardware_key"]] = r[pc]
    if not any(measured.values()):
        return ""
    return plots.io_vs_probe([ch for ch, _ in CHANNELS], measured, probe, order)


def io_table(latest: list[dict[str, Any]], hw: dict[str, Any]) -> Markup:
    rows = []
    for key in hw:
        mine = [r for r in latest if r["hardware_key"] == key and r["status"] == "ok"]
        for ch, pc in CHANNELS:
            s = summarize([r[ch] for r in mine])
            limit = summarize([r[pc] for r in mine])
            if s is None:
                continue
            best = s.hi / limit.median if limit and limit.median else None
            rows.append([key, ch.removesuffix("_gbps"), num(s.median), num(s.hi), num(limit.median if limit else None),
                         "—" if best is None else f"{best:.2f}"])
    return table(["hardware", "channel", "median GB/s", "best GB/s", "probe GB/s", "best / probe"], rows)


def compare_tables(latest: list[dict[str, Any]], metrics: tuple[str, ...]) -> Markup:
    comp = compare(latest, metrics)
    out = []
    for t in comp.tables:
        head = ["config"] + [c.split("-")[0] + ("  (ref)" if c == t.ref else "") for c in t.columns]
        body = []
        for row in t.rows:
            cells = []
            for c in t.columns:
                cell = t.cells.get((row, c))
                if cell is None:
                    cells.append("—")
                    continue
                ratio = "" if c == t.ref or cell.ratio is None else f" ×{cell.ratio:.2f}"
                cells.append(f"{num(cell.summary.median)} ±{cell.summary.spread * 100:.0f}% n={cell.summary.n}{ratio}")
            body.append([t.labels[row], *cells])
        out.append(section(t.metric.name, t.metric.describe(), content=table(head, body), level=3))
    return Markup().join(out)


def history_section(h: History, labels: dict[str, str], order: list[str], baseline: Baseline) -> Markup:
    """Suite-run medians over nights, a figure per metric, marked where `bench regress` flagged them."""
    if len(h.starts) < 2:
        return section("History", "one suite run so far: history starts with the second")
    ticks = [f"{t:%m-%d}" for t in h.starts.values()]
    figures = [section(METRICS[m].describe(), figure=history_figure(m, panels, labels, order, ticks), level=3)
               for m, panels in h.panels.items() if panels]
    note = (f"{len(h.starts)} suite runs; points are suite-run medians; red ▼ regression, green ▲ improvement as "
            f"`bench regress` judged each night against its own baseline ({baseline.describe()}); dashed lines: "
            f"change points, where a new level begins (red worse, green better); at most {plots.MAX_PANELS} "
            "configs per metric")
    rows = [[labels.get(ck, ck), hk, c.metric, f"{c.started_at:%Y-%m-%d}" if c.started_at else "—", c.suite_run_id,
             (c.commit or "several")[:10], f"{num(c.before)} → {num(c.after)}", pct(c.rel),
             "worse" if c.worse else "better"] for (ck, hk), cs in h.changes.items() for c in cs]
    points = section("Change points", "where the level of a metric changed, over each pair's whole history",
                     content=table(["config", "hardware", "metric", "from", "suite run", "commit", "level", "change",
                                    ""], rows, row_class=lambda r: "regression" if r[-1] == "worse" else "improvement",
                                   empty="None: no change of level beyond the noise and the floors."), level=3)
    return section("History over nights", note, content=Markup().join([*figures, points]))


def history_figure(metric: str, panels: list[tuple[str, list[Series]]], labels: dict[str, str], order: list[str],
                   ticks: list[str]) -> str:
    return plots.history([(labels[ck], lines) for ck, lines in panels], METRICS[metric].unit or metric, order, ticks)


def suspect_section(rows: list[dict[str, Any]], labels: dict[str, str]) -> Markup:
    """Runs whose attainment beat their floor (`floor_suspect`): their floor's figures were too low,
    so their attainment is not evidence of anything; each row says which SSD figures the floor had."""
    bad = [r for r in rows if r.get("floor_suspect")]
    fig = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
    body = [["⚠ suspect", f"{r['finished_at']:%Y-%m-%d %H:%M}" if r["finished_at"] else "—", r["suite_run_id"],
             r["run_id"], r["host"] or "(no host)", labels.get(r["config_key"], r["config_key"] or "?"),
             f"{fig(r['attainment_decode'])} / {fig(r['attainment_prefill'])}",
             f"{fig(r.get('ssd_before_gbps'))} / {fig(r.get('ssd_after_gbps'))}", fig(r.get("floor_ssd_gbps")),
             "—" if r.get("floor_ssd_spread") is None else f"{r['floor_ssd_spread']:.0%}", fig(r["probe_ssd_gbps"])]
            for r in reversed(bad)]
    columns = ["floor", "finished", "suite run", "run", "host", "config", "attainment decode / prefill",
               "SSD before / after GB/s", "floor SSD GB/s", "spread", "probe SSD GB/s"]
    note = (f"attainment above {SUSPECT_ATTAINMENT}: the run moved its bytes faster than the figures its floor "
            "was built on, which says the figures were low (a drifting disk), not that the engine beat the "
            "hardware; newest first")
    return section(f"Suspect floors ({len(bad)})" if bad else "Suspect floors", note if bad else "",
                   content=table(columns, body, row_class=lambda r: "suspect",
                                 empty=f"None: no run's attainment is above {SUSPECT_ATTAINMENT}."))


def failures_section(rows: list[dict[str, Any]], labels: dict[str, str]) -> Markup:
    failed = [r for r in rows if r["status"] != "ok"]
    body = [[f"{r['finished_at']:%Y-%m-%d %H:%M}" if r["finished_at"] else "—", r["suite_run_id"], r["run_id"],
             r["host"] or "(no host)", labels.get(r["config_key"], r["config_key"] or "?"), r["attempts"],
             r["error"] or "(no reason recorded)"] for r in reversed(failed)]
    columns = ["finished", "suite run", "run", "host", "config", "attempts", Column("error", pre=True)]
    return section(f"Failed runs ({len(failed)})" if failed else "Failed runs", "newest first" if failed else "",
                   content=table(columns, body, empty="None."))
