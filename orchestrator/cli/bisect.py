"""`bench bisect`: the first commit that made a regressed (config, hardware) pair slower.

A thin Click command over orchestrator.bisect; the table and the verdict are printed here.
"""

from __future__ import annotations

import sys

import click

from orchestrator.cli.console import console, err_console
from orchestrator.cli.options import address_option, results_option
from worker.errors import UserError


@click.command("bisect")
@results_option
@address_option
@click.option("--suite", default=None, metavar="SUITE", help="Only this suite's runs pick the pair (and, when it is a "
                                                              "suite YAML or embedded name, its thresholds).")
@click.option("--config-key", default=None, metavar="KEY", help="The pair's config key (a prefix) [default: the "
                                                                "newest regressed pair of the newest suite run].")
@click.option("--hardware-key", default=None, metavar="KEY", help="The pair's hardware key (a prefix).")
@click.option("--good", default=None, metavar="SHA", help="A commit without the regression [default: the git_commit of "
                                                          "the pair's last good suite run].")
@click.option("--bad", default=None, metavar="SHA", help="A commit with it [default: the git_commit of the pair's "
                                                         "first bad suite run].")
@click.option("--metric", "metric_name", default=None, metavar="METRIC",
              help="Metric to bisect on [default: the one the pair regressed in; decode_ms].")
@click.option("--repeats", type=click.IntRange(min=2), default=3, show_default=True,
              help="Runs per commit before the noise test decides.")
@click.option("--max-repeats", type=click.IntRange(min=2), default=8, show_default=True,
              help="Most runs per commit while the noise test cannot decide.")
@click.option("--repo", default=None, type=click.Path(file_okay=False),
              help="Git repository holding the commits [default: the checkout this bench runs from].")
def bisect_cmd(results: str | None, address: str | None, suite: str | None, config_key: str | None,
               hardware_key: str | None, good: str | None, bad: str | None, metric_name: str | None, repeats: int,
               max_repeats: int, repo: str | None) -> None:
    """Find the first bad commit of a regressed (config, hardware) pair by running it at commits between.

    Each commit's tree (`git archive`) runs that commit's own `bench run` on a host with the pair's
    hardware (Ray runtime_env working_dir); good and bad are measured first, then a binary search
    judges each commit with the noise test of `bench regress` against both. Every run is a row of
    suite `<suite>.bisect` (`bench regress` never uses those as a baseline). Exit code 0: named; 3:
    not reproduced (bad is not beyond the noise of good); 1: could not name one commit; 2: bad input.
    """
    from orchestrator.bisect.measure import bisect
    from orchestrator.bisect.pair import choose, load_rows
    from orchestrator.bisect.search import Settings
    from orchestrator.regress.gate import resolve_gate, suite_thresholds
    from orchestrator.results.store import default_uri
    from worker.host.hostinfo import source_root

    if max_repeats < repeats:
        raise UserError(f"--max-repeats {max_repeats} is below --repeats {repeats}")
    results = results or default_uri()
    name, from_suite = suite_thresholds(suite)
    gate_for = lambda found: resolve_gate(from_suite if suite else suite_thresholds(found)[1])  # noqa: E731
    choice = choose(load_rows(results), gate_for, suite=name, config_key=config_key, hardware_key=hardware_key,
                    metric_name=metric_name, good=good, bad=bad)
    err_console.print(f"bisecting {choice.why}", highlight=False, soft_wrap=True)
    gate = gate_for(choice.pair.suite)
    report = bisect(results, choice, repo=repo or str(source_root()), address=address,
                    settings=Settings(repeats, max_repeats, gate.z, gate.noise_floor))
    console.print(render(report))
    for line in summary(report):
        console.print(line, highlight=False, soft_wrap=True)
    if report.exit_code:
        sys.exit(report.exit_code)


def render(report):
    """The table: every commit measured, in history order; a z beyond its critical value is starred."""
    from rich import box
    from rich.table import Table

    out = report.outcome
    m = report.choice.metric
    changes = [c for j in out.judged for c in (j.vs_good, j.vs_bad) if c is not None]
    crits = sorted({round(c.critical, 1) for c in changes})
    crit = f"{crits[0]:g}" if len(crits) == 1 else f"{crits[0]:g} to {crits[-1]:g}" if crits else "n/a"
    t = Table(title=f"bisect · {report.choice.pair.describe()} · {m.name} ({m.unit or 'value'}, {m.better} is better)"
                    f" · {report.host}", caption=f"z-scores vs the good and the bad commit's runs; * beyond the noise (|z| above its "
                                    f"critical value, {crit})",
              box=box.SIMPLE_HEAD, show_edge=False)
    t.add_column("commit", no_wrap=True, min_width=10)
    t.add_column("subject", no_wrap=True, overflow="ellipsis", max_width=16)
    for col in ("n", "median", "vs good", "vs bad"):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("verdict", overflow="fold")
    order = {c: i for i, c in enumerate(report.commits)}
    for j in sorted(out.judged, key=lambda j: order[j.commit]):
        tried = f"{j.n}" + (f"+{len(j.errors)}✗" if j.errors else "")
        verdict = j.verdict or "—"
        if j.how and j.how != "noise test":
            verdict += f": {j.how}" if j.verdict == "skip" else f" ({j.how})"
        t.add_row(j.commit[:10], report.subjects.get(j.commit, ""), tried,
                  "—" if j.median is None else f"{j.median:,.4g}", _z(j.vs_good), _z(j.vs_bad), verdict)
    return t


def summary(report) -> list[str]:
    out, m = report.outcome, report.choice.metric
    lines = []
    if out.status == "found":
        first = out.first_bad
        lines.append(f"first bad commit: {first} {report.subjects.get(first, '')}")
        lines.append(f"evidence: {_evidence(report)}")
    elif out.status == "not-reproduced":
        lines.append(out.message)
    else:
        lines.append(out.message)
        lines += [f"  {c} {report.subjects.get(c, '')}" for c in out.candidates]
    closer = [j for j in out.judged if j.how.startswith("closer median")]
    if closer:
        lines.append(f"note: {len(closer)} verdict(s) by the closer median, not the noise test: "
                     + ", ".join(j.commit[:12] for j in closer))
    lines.append(f"rows: {report.rows} runs of {m.name} in suite {report.suite}, suite run {report.suite_run_id} "
                 f"({report.where})")
    return lines


def _evidence(report) -> str:
    out, m = report.outcome, report.choice.metric
    order = {c: i for i, c in enumerate(report.commits)}
    first = next(j for j in out.judged if j.commit == out.first_bad)
    before = max((j for j in out.judged if j.verdict == "good" and order[j.commit] < order[first.commit]),
                 key=lambda j: order[j.commit])
    rel = (first.median - before.median) / abs(before.median) if before.median else float("nan")
    vs = first.vs_good
    noise = f"; vs good: z {vs.z:+.1f}, critical {vs.critical:.1f}" if vs is not None else ""
    return (f"{m.name} median {before.median:,.4g} at {before.commit[:12]} (good, {before.n} runs) → "
            f"{first.median:,.4g} at {first.commit[:12]} ({first.n} runs), {rel:+.1%}{noise}")


def _z(change) -> str:
    return "—" if change is None else f"{change.z:+.1f}" + ("*" if abs(change.z) > change.critical else "")


COMMANDS = [bisect_cmd]
