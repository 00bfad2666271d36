"""Progress of a suite run: counts per host, what each running run is doing, and how to draw it.

The scheduler updates a `Progress`; the CLI draws it with `render_progress` inside a rich Live (only
when stdout is a terminal), `render_rows` at the end and `time_share` under it (how much of the runs'
wall time was measurement). Nothing here prints.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table
from rich.text import Text  # cells are plain text: run ids, phases and errors hold brackets, not markup


@dataclass
class Progress:
    queued: int = 0
    names: dict[str, str] = field(default_factory=dict)  # node id → display name
    running: dict[str, tuple[str, str]] = field(default_factory=dict)  # run id → (host, slot)
    phases: dict[str, str] = field(default_factory=dict)  # run id → engine phase
    host_of: dict[str, str] = field(default_factory=dict)  # run id → host of its last attempt
    done: Counter = field(default_factory=Counter)  # host → ok runs
    failed: Counter = field(default_factory=Counter)  # host → failed runs
    retries: int = 0
    skipped: int = 0
    cancelled: int = 0

    def start(self, run_id: str, host: str, slot: str) -> None:
        self.running[run_id] = (host, slot)
        self.host_of[run_id] = host
        self.phases.pop(run_id, None)

    def finish(self, run_id: str, status: str) -> None:
        self.running.pop(run_id, None)
        host = self.host_of.get(run_id, "-")
        (self.done if status == "ok" else self.failed)[host] += 1

    def retry(self, run_id: str) -> None:
        self.running.pop(run_id, None)
        self.retries += 1

    def skip(self, run_id: str) -> None:
        self.skipped += 1

    def load(self, node_id: str) -> int:
        name = self.names.get(node_id)
        return sum(1 for host, _ in self.running.values() if host == name)

    @property
    def finished(self) -> int:
        return sum(self.done.values()) + sum(self.failed.values())

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())


def render_progress(p: Progress, title: str = "") -> Table:
    """Per host: ok / failed / running, and each running run with its slot and phase."""
    t = Table(title=f"{title}  {p.finished}/{p.queued} finished"
                    + (f", {p.retries} retried" if p.retries else "") + (f", {p.skipped} skipped" if p.skipped else ""),
              title_justify="left")
    for col in ("host", "ok", "failed", "running"):
        t.add_column(col)
    hosts = sorted(set(p.done) | set(p.failed) | {h for h, _ in p.running.values()})
    for host in hosts:
        runs = [f"{rid} @{slot} [{p.phases.get(rid, 'starting')}]" for rid, (h, slot) in sorted(p.running.items())
                if h == host]
        t.add_row(Text(host), str(p.done[host]), str(p.failed[host]), Text("\n".join(runs) or "-"))
    return t


RESULT_COLUMNS = ("run_id", "status", "host", "nvme_device", "model", "mode", "batch_size", "prompt_len",
                  "ttft_ms", "decode_tok_s", "e2e_ms", "attainment_decode", "error")
# What fits 80 columns: the run (a short id), where, what, and the numbers that matter most.
NARROW_COLUMNS = ("run_id", "status", "host", "model", "mode", "batch_size", "prompt_len", "decode_tok_s",
                  "attainment_decode", "error")
HEADERS = {"run_id": "run", "batch_size": "batch", "prompt_len": "prompt", "decode_tok_s": "tok/s",
           "attainment_decode": "attain", "ttft_ms": "TTFT ms", "e2e_ms": "e2e ms", "nvme_device": "nvme",
           "max_new_tokens": "new", "suite_run_id": "suite run", "finished_at": "finished"}
SHORT_ID = 6  # hex digits of a run id's spec hash shown by default (more where they collide)


def render_rows(rows: list[dict[str, Any]], columns: tuple[str, ...] = RESULT_COLUMNS, title: str = "",
                wide: bool = True) -> Table:
    """Rows as a table. Not `wide`: the columns of NARROW_COLUMNS that are given, a column whose value
    is the same in every row said once in the caption instead, run ids cut to their shortest unique
    prefix, errors folded into the width left, so the table reads at 80 columns; `wide` shows
    everything as it is."""
    caption = None
    if not wide:
        columns = tuple(c for c in NARROW_COLUMNS if c in columns)
        same = [c for c in columns if c not in ("run_id", "status", "error") and len(rows) > 1
                and len({_fmt(r.get(c)) for r in rows}) == 1]
        columns = tuple(c for c in columns if c not in same)
        caption = " · ".join(f"{HEADERS.get(c, c)} {_fmt(rows[0].get(c))}" for c in same) or None
    short = _short_ids(rows) if not wide else {}
    t = Table(title=title or None, title_justify="left", caption=caption, caption_justify="left")
    for col in columns:
        if col == "error":
            t.add_column(HEADERS.get(col, col), overflow="fold", ratio=1, min_width=None if wide else 16,
                         max_width=60 if wide else None)
        else:
            t.add_column(HEADERS.get(col, col) if not wide else col, overflow="fold", no_wrap=not wide)
    for row in rows:
        t.add_row(*(Text(short.get(row.get(c), _fmt(row.get(c))) if c == "run_id" else _fmt(row.get(c)))
                    for c in columns))
    return t


def time_share(rows: list[dict[str, Any]]) -> str | None:
    """One line: the runs' wall time (process start to result, setup phases included), the time in
    their measured rounds, and the share that was measurement; None when no row has timings."""
    timed = [r for r in rows if r.get("wall_s")]
    if not timed:
        return None
    wall = sum(r["wall_s"] for r in timed)
    measured = sum(r.get("measure_s") or 0.0 for r in timed)
    return (f"time: {wall:,.1f} s of wall time in {len(timed)} runs, {measured:,.1f} s in measured rounds "
            f"({measured / wall:.1%} measurement)")


def _short_ids(rows: list[dict[str, Any]]) -> dict[str, str]:
    """run id (hash-rN) → its shortest prefix of at least SHORT_ID hex digits unique among `rows`."""
    ids = sorted({r["run_id"] for r in rows if r.get("run_id")})
    for n in range(SHORT_ID, 17):
        cut = {i: i.partition("-")[0][:n] + ("-" + i.partition("-")[2] if "-" in i else "") for i in ids}
        if len(set(cut.values())) == len(ids):
            return cut
    return {i: i for i in ids}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)
