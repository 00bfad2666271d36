"""Detached suites: `bench submit --detach` as a Ray Job (for nightly cron), `bench status` / `bench logs`.

The job's entrypoint is `bench submit` itself, run on the head node with RAY_ADDRESS set by Ray Jobs,
so a detached suite behaves exactly like an attached one. A suite file travels in the job's
working_dir. The job's submission id is the suite run id. Ray Jobs need `ray[default]` (the dashboard's
HTTP server); without it we say so in one line.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import tempfile
from pathlib import Path
from typing import Any, Callable

from orchestrator.cluster import split_address
from worker import envs
from worker.errors import UserError

log = logging.getLogger(__name__)

DASHBOARD_PORT = 8265
INSTALL_HINT = "Ray Jobs need the dashboard: pip install 'ray[default]'"


def dashboard_address(address: str | None) -> str:
    """http(s) addresses are used as given; a GCS HOST:PORT maps to http://HOST:8265."""
    address = address or envs.ray_address()
    if not address or address in ("auto", "local"):
        return f"http://127.0.0.1:{DASHBOARD_PORT}"
    if address.startswith(("http://", "https://")):
        return address
    host, _ = split_address(address)
    return f"http://{host}:{DASHBOARD_PORT}"


def client(address: str | None) -> Any:
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    url = dashboard_address(address)
    try:
        return JobSubmissionClient(url)
    except RuntimeError as e:
        if "ray[default]" in str(e):
            raise UserError(INSTALL_HINT) from None
        raise
    except ConnectionError as e:
        raise UserError(f"cannot reach the Ray dashboard at {url} ({e}); pass --address http://HEAD:8265") from None


def submit_detached(suite_ref: str, suite_source: Path | None, results: str, suite_run_id: str,
                    address: str | None) -> str:
    """Submit the suite as a Ray Job; returns the job's submission id (= the suite run id)."""
    jobs = client(address)
    runtime_env: dict[str, Any] = {}
    suite_arg = suite_ref
    if suite_source is not None:  # a file: ship it in the job's working_dir
        work = Path(tempfile.mkdtemp(prefix="streambench-job-"))
        (work / "suite.yaml").write_text(suite_source.read_text())
        runtime_env["working_dir"] = str(work)
        suite_arg = "suite.yaml"
    if "://" not in results:
        results = str(Path(results).expanduser().resolve())
        log.warning("results go to %s on the node that runs the job (use a shared URI for remote heads)", results)
    entrypoint = shlex.join(["bench", "submit", suite_arg, "--results", results, "--suite-run-id", suite_run_id])
    return jobs.submit_job(entrypoint=entrypoint, submission_id=suite_run_id, runtime_env=runtime_env or None,
                           metadata={"streambench": "submit"})


def job_status(job_id: str | None, address: str | None) -> list[dict[str, Any]]:
    """One job, or every streambench job the cluster knows, newest first."""
    jobs = client(address)
    infos = [jobs.get_job_info(job_id)] if job_id else [
        j for j in jobs.list_jobs() if (j.metadata or {}).get("streambench") == "submit"]
    out = [{"job": j.submission_id, "status": str(getattr(j.status, "value", j.status)), "message": j.message,
            "start_time": j.start_time, "end_time": j.end_time, "entrypoint": j.entrypoint} for j in infos]
    return sorted(out, key=lambda r: r["start_time"] or 0, reverse=True)


def job_logs(job_id: str, address: str | None, follow: bool, emit: Callable[[str], None]) -> None:
    jobs = client(address)
    if not follow:
        emit(jobs.get_job_logs(job_id))
        return

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            emit(chunk)

    asyncio.run(tail())
