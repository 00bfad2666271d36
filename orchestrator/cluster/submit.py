"""`bench submit`: run a suite on the cluster, one result row per run, written as each run finishes.

Resubmitting a suite run id finishes it: runs already recorded ok are skipped, failed ones run again
and their new row replaces the old (same file name), so the dataset never holds two rows of one run.
Ctrl-C cancels what is queued or running and keeps every finished row; the returned summary says how
to resume.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from orchestrator.cluster.actor import RunFn, RunOutcome
from orchestrator.cluster.connect import ray_session
from orchestrator.cluster.hosts import check_selectable, idle_gpu_notes, list_nodes
from orchestrator.cluster.lease import claim
from orchestrator.cluster.progress import Progress
from orchestrator.results.schema import build_row
from orchestrator.results.store import recorded, remove, write_row
from orchestrator.suite.load import Suite
from orchestrator.suite.spec import RunSpec
from worker.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class SubmitResult:
    suite: str
    suite_run_id: str
    results_uri: str
    where: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)  # written by this submission
    already_recorded: list[str] = field(default_factory=list)  # run ids skipped (ok rows exist)
    progress: Progress = field(default_factory=Progress)
    interrupted: bool = False

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r["status"] != "ok")


def new_suite_run_id(suite: str, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return f"{suite}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def plan_rows(suite: Suite) -> list[dict[str, Any]]:
    """The plan as rows for `--dry-run`."""
    return [{"run_id": s.run_id, "model": s.model.name, "mode": s.flat["mode"], "batch_size": s.flat["batch_size"],
             "prompt_len": s.flat["prompt_len"], "max_new_tokens": s.flat["max_new_tokens"],
             "engine": s.flat["engine"], "host": s.selector.describe()}
            for s in suite.specs]


def submit(suite: Suite, results_uri: str, suite_run_id: str, *, address: str | None = None,
           run_fn: RunFn | None = None, on_update: Callable[[Progress], None] | None = None,
           poll_s: float = 0.5) -> SubmitResult:
    """Run every spec of `suite` not yet recorded under `suite_run_id`; write each row at once. The suite
    run id is claimed for the whole submission (orchestrator.cluster.lease): a second live submit of
    it is refused."""
    with claim(results_uri, suite_run_id):
        return _submit(suite, results_uri, suite_run_id, address, run_fn, on_update, poll_s)


def _submit(suite: Suite, results_uri: str, suite_run_id: str, address: str | None, run_fn: RunFn | None,
            on_update: Callable[[Progress], None] | None, poll_s: float) -> SubmitResult:
    from orchestrator.cluster.scheduler import Scheduler

    out = SubmitResult(suite.name, suite_run_id, results_uri)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    earlier = recorded(results_uri, suite.name, suite_run_id)
    out.already_recorded = [s.run_id for s in suite.specs if s.run_id in earlier and earlier[s.run_id].status == "ok"]
    todo = [s for s in suite.specs if s.run_id not in out.already_recorded]
    if out.already_recorded:
        log.info("suite run %s: %d runs already recorded, %d to go", suite_run_id, len(out.already_recorded),
                 len(todo))

    def record(spec: RunSpec, outcome: RunOutcome) -> None:
        row = build_row(spec, suite_run_id, outcome)
        try:
            path = write_row(results_uri, row, suite.name, date)
        except OSError as e:  # the suite stops; every row written so far stays
            raise UserError(f"cannot write the row of run {spec.run_id} to {results_uri} ({e.strerror or e}); the "
                            f"{len(out.rows)} row(s) written so far are kept: fix the store, then resume with "
                            f"`bench submit {suite.source} --suite-run-id {suite_run_id} --results {results_uri}`") from None
        old = earlier.get(spec.run_id)
        if old is not None and old.path != path:  # a failed row from another day: replaced, not duplicated
            remove(results_uri, old.path)
        out.rows.append(row)

    if not todo:
        return out
    with ray_session(address) as where:
        out.where = where
        nodes = list_nodes()
        check_selectable({s.run_id: s.selector for s in todo}, nodes)  # bad advertisements: before any run
        for note in idle_gpu_notes(nodes):
            log.warning("%s", note)
        scheduler = Scheduler(todo, record, retries=suite.doc.retries, on_no_host=suite.doc.on_no_host,
                              run_fn=run_fn, on_update=on_update, poll_s=poll_s, progress=out.progress)
        try:
            scheduler.run()
        except KeyboardInterrupt:
            out.interrupted = True
            log.warning("interrupted: %d runs recorded, %d cancelled", len(out.rows), out.progress.cancelled)
    return out
