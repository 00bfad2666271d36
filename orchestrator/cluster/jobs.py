"""Detached suites: `bench submit --detach` as a Ray Job (for nightly cron), `bench status` / `bench logs`.

The job's entrypoint is `bench submit` itself, run on the head node with RAY_ADDRESS set by Ray Jobs,
so a detached suite behaves exactly like an attached one. A suite file travels in the job's
working_dir. The job's submission id is the suite run id (resubmitting a finished one to resume it
gets `ID.2`, `ID.3`, ...). Ray Jobs need `ray[default]` (the dashboard's HTTP server); without it we
say so in one line.

Traps handled here, each turned into one line that says what to do:
- `bench` must be found by the head's shell: Ray runs the entrypoint with the PATH `ray start` had,
  which often lacks the virtualenv's bin directory. The entrypoint looks on that PATH first, then in
  the bin directory of the interpreter that submits (same machine, or the same install layout);
- the dashboard refuses requests without the cluster's token once token authentication is on
  (RAY_NOTES.md): we connect in token mode when a token is available, like orchestrator.cluster;
- an unreachable dashboard: `requests` would wait without a timeout, so a 3-second TCP check first;
- Ray answers a reused submission id with a 500 and a server traceback: we look before submitting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import shutil
import socket
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from orchestrator.cluster.connect import AUTH_HINT, CONNECT_CHECK_S, prefer_token_auth, split_address
from worker import envs
from worker.errors import UserError

log = logging.getLogger(__name__)

DASHBOARD_PORT = 8265
INSTALL_HINT = "Ray Jobs need the dashboard: pip install 'ray[default]'"
ADDRESS_HINT = "pass --address http://HEAD:8265 (the head's dashboard; its Ray needs ray[default])"
TERMINAL = ("STOPPED", "SUCCEEDED", "FAILED")
METADATA_KEY = "streambench"
LOG_COLUMNS = 160
# Ray's client logs every package upload and websocket close at INFO: noise next to our own lines
CHATTY_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                  "ray._private.runtime_env.packaging")


def dashboard_address(address: str | None) -> str:
    """http(s) addresses are used as given; a GCS HOST:PORT maps to http://HOST:8265."""
    address = address or envs.ray_address()
    if not address or address in ("auto", "local"):
        return f"http://127.0.0.1:{DASHBOARD_PORT}"
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    host, _ = split_address(address)
    return f"http://{host}:{DASHBOARD_PORT}"


class NoSuchJob(UserError):
    pass


class Jobs:
    """A JobSubmissionClient whose failures are one-line UserErrors naming the dashboard."""

    def __init__(self, address: str | None):
        try:
            import aiohttp  # noqa: F401  (plain `ray` has the SDK but not its HTTP stack: fail before connecting)
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise UserError(INSTALL_HINT) from None
        self.url = dashboard_address(address)
        check_dashboard(self.url)
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        prefer_token_auth()  # before the client: it reads the auth mode when it builds its headers
        with self.calls():
            try:
                self.client = JobSubmissionClient(self.url)
            except RuntimeError as e:
                if "ray[default]" in str(e):
                    raise UserError(INSTALL_HINT) from None
                raise

    @contextlib.contextmanager
    def calls(self, job_id: str | None = None) -> Iterator[None]:
        from requests.exceptions import RequestException  # a dependency of ray[default]

        try:
            from ray.exceptions import AuthenticationError
        except ImportError:  # a Ray without token authentication
            AuthenticationError = ()  # noqa: N806
        try:
            yield
        except AuthenticationError:
            raise UserError(f"the Ray dashboard at {self.url} requires the cluster's auth token; {AUTH_HINT}") from None
        except (ConnectionError, RequestException) as e:
            raise UserError(f"cannot reach the Ray dashboard at {self.url} ({first_line(e)}); {ADDRESS_HINT}") from None
        except RuntimeError as e:
            if job_id is not None and "status code 404" in str(e):
                raise NoSuchJob(f"no job {job_id!r} at {self.url}; `bench status` lists the detached suites") from None
            if "No available agent" in str(e):  # the head's dashboard agent is not up (yet)
                raise UserError(f"the Ray head at {self.url} has no job agent: try again in a few seconds; if it "
                                "persists, see dashboard_agent.log in the head's Ray session logs (e.g. port "
                                "52365 taken: start it with --dashboard-agent-listen-port)") from None
            raise UserError(f"the Ray dashboard at {self.url} failed: {first_line(e)}") from None

    def info(self, job_id: str) -> Any:
        with self.calls(job_id):
            return self.client.get_job_info(job_id)

    def find(self, job_id: str) -> Any | None:
        try:
            return self.info(job_id)
        except NoSuchJob:
            return None


def check_dashboard(url: str, timeout_s: float = CONNECT_CHECK_S) -> None:
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise UserError(f"cannot reach the Ray dashboard at {url} ({reason}); {ADDRESS_HINT}") from None


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def client(address: str | None) -> Jobs:
    return Jobs(address)


def entrypoint(args: list[str]) -> str:
    """`bench ...` for the head's shell: its PATH first, then this interpreter's bin directory.

    COLUMNS: the job's output is a log file, where rich would otherwise fold tables to 80 columns.
    """
    bin_dir = str(Path(sys.executable).parent)
    return f"COLUMNS={LOG_COLUMNS} PATH=\"$PATH\":{shlex.quote(bin_dir)} {shlex.join(['bench', *args])}"


def submit_detached(suite_ref: str, suite_source: Path | None, results: str, suite_run_id: str,
                    address: str | None) -> str:
    """Submit the suite as a Ray Job; returns the job's submission id (the suite run id, see above)."""
    jobs = client(address)
    job_id = free_job_id(jobs, suite_run_id)
    if "://" not in results:
        results = str(Path(results).expanduser().resolve())
        log.warning("results go to %s on the node that runs the job (use a shared URI for remote heads)", results)
    runtime_env: dict[str, Any] = {}
    suite_arg, work = suite_ref, None
    if suite_source is not None:  # a file: ship it in the job's working_dir (uploaded by submit_job)
        work = Path(tempfile.mkdtemp(prefix="streambench-job-"))
        (work / "suite.yaml").write_text(suite_source.read_text())
        runtime_env["working_dir"] = str(work)
        suite_arg = "suite.yaml"
    try:
        with jobs.calls():
            return jobs.client.submit_job(
                entrypoint=entrypoint(["submit", suite_arg, "--results", results, "--suite-run-id", suite_run_id]),
                submission_id=job_id, runtime_env=runtime_env or None,
                metadata={METADATA_KEY: "submit", "suite_run_id": suite_run_id})
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def free_job_id(jobs: Jobs, suite_run_id: str) -> str:
    """The suite run id, or `ID.N` when earlier jobs of it have ended; refused while one still runs."""
    job_id, n = suite_run_id, 1
    while (job := jobs.find(job_id)) is not None:
        status = status_name(job.status)
        if status not in TERMINAL:
            raise UserError(f"suite run {suite_run_id} is already running as job {job_id} ({status}); "
                            f"follow it with `bench logs {job_id} --follow`")
        n += 1
        job_id = f"{suite_run_id}.{n}"
    return job_id


def status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def job_status(job_id: str | None, address: str | None) -> list[dict[str, Any]]:
    """One job, or every streambench job the cluster knows, newest first."""
    jobs = client(address)
    if job_id:
        infos = [jobs.info(job_id)]
    else:
        with jobs.calls():
            infos = [j for j in jobs.client.list_jobs() if (j.metadata or {}).get(METADATA_KEY) == "submit"]
    rows = [{"job": j.submission_id, "suite_run_id": (j.metadata or {}).get("suite_run_id"),
             "status": status_name(j.status), "message": j.message, "start_time": _time(j.start_time),
             "end_time": _time(j.end_time), "entrypoint": j.entrypoint} for j in infos]
    return sorted(rows, key=lambda r: r["start_time"] or "", reverse=True)


def _time(ms: int | None) -> str | None:
    """Ray reports milliseconds since the epoch; we show UTC."""
    return None if not ms else datetime.fromtimestamp(ms / 1e3, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def job_logs(job_id: str, address: str | None, follow: bool, emit: Callable[[str], None]) -> None:
    jobs = client(address)
    if not follow:
        with jobs.calls(job_id):
            emit(jobs.client.get_job_logs(job_id))
        return
    jobs.info(job_id)  # a missing job: one line, not a websocket handshake error

    async def tail() -> None:
        async for chunk in jobs.client.tail_job_logs(job_id):
            emit(chunk)

    with jobs.calls(job_id):
        asyncio.run(tail())
