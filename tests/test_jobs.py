"""Detached suites against a real Ray Jobs server: `bench submit --detach`, `bench status`, `bench logs`.

One head for the module, as users start it: `ray start --head --block` with the dashboard, in its own
temp dir, on free ports only (other Rays may run on this machine: the fixed defaults, client server
10001 and dashboard agent 52365, are taken too). Ctrl-C to that process stops its node; nothing else's
Ray is touched (no `ray stop`). The head is set up the way the traps of RAY_NOTES.md bite users: token
authentication on (with its own token file, so the test does not depend on ~/.ray), and a PATH without
this virtualenv's bin directory, as a head started by cron or systemd has (the job must still find
`bench`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="ray[default] (the dashboard and Ray Jobs) is not installed")

import benchcli  # noqa: E402

from orchestrator.results.store import read_results  # noqa: E402

pytestmark = pytest.mark.ray

# `python -m ray.scripts.scripts`, stopped by Ctrl-C even under a runner that ignores SIGINT (benchcli says why)
RAY = benchcli.interruptible("import runpy; runpy.run_module('ray.scripts.scripts', run_name='__main__', "
                             "alter_sys=True)")
SUITE = """name: detached
models: [{name: t, preset: tiny, layers: 2, overrides: {vocab_size: 1000}}]
defaults: {batch_size: 1, prompt_len: 8, max_new_tokens: 4, max_seq_len: 64, warmup_rounds: 0, temperature: 0}
matrix: {mode: [gpu, ssd]}
"""


def closed_port() -> int:
    """A port nothing listens on (bound once to port 0, then released); also how we pick a free one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    """(dashboard URL, environment for `bench`) of a token-auth head with the dashboard, on free ports."""
    tmp = Path(tempfile.mkdtemp(prefix="sbjob-"))  # short: Ray's socket paths must fit 107 bytes
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    bin_dir = str(Path(sys.executable).parent)
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    head_env = {**base, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(token), "STREAMBENCH_CACHE": str(tmp / "cache"),
                "PATH": os.pathsep.join(p for p in base.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                        if p and Path(p) != Path(bin_dir))}
    # every fixed default port too (client server 10001, agent 52365): other Rays may run on this machine
    ports: set[int] = set()
    while len(ports) < 4:
        ports.add(closed_port())
    gcs, dashboard, agent, client = sorted(ports)
    log = tmp / "head.log"
    with open(log, "wb") as out:  # a file, not a pipe: nobody reads it while the head runs
        proc = subprocess.Popen([*RAY, "start", "--head", "--block", "--port", str(gcs), "--include-dashboard=true",
                                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                                 "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client),
                                 "--num-cpus", "2", "--temp-dir", str(tmp / "ray"), "--disable-usage-stats"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=head_env, cwd=tmp,
                                start_new_session=True)
    try:
        said = wait_for_text(proc, log, "block forever", timeout_s=60)  # printed once the node is up
        assert "block forever" in said, said[-3000:]
        yield f"http://127.0.0.1:{dashboard}", {**base, "RAY_USAGE_STATS_ENABLED": "0",
                                                "RAY_AUTH_TOKEN_PATH": str(token), "COLUMNS": "200"}
    finally:
        stop_head(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def wait_for_text(proc: subprocess.Popen, log: Path, needle: str, timeout_s: float) -> str:
    """What the process wrote until `needle`, its exit, or the timeout."""
    deadline = time.monotonic() + timeout_s
    while needle not in (said := log.read_text(errors="replace")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    return said


def stop_head(proc: subprocess.Popen) -> None:
    """Ctrl-C to `ray start --block` stops its node (its processes exit within a second or so); what is
    still alive after 10 s in the session we started is killed, pid by pid."""
    proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while (alive := live_session_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=10)


def live_session_members(sid: int) -> list[int]:
    """Processes (not zombies) of session `sid`: those `ray start` started, and theirs."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if int(session) == sid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def bench(*args: str, env: dict, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return benchcli.bench(*args, timeout=timeout, env=env, cwd=cwd)


def test_detached_suite_runs_as_a_ray_job_and_is_followed_by_status_and_logs(head, tmp_path):
    url, env = head
    (tmp_path / "suite.yaml").write_text(SUITE)
    t0 = time.monotonic()
    done = bench("submit", "suite.yaml", "--detach", "--address", url, "--results", "res", "--suite-run-id",
                 "night-1", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "submitted job night-1;" in done.stdout and "bench status night-1" in done.stdout
    assert time.monotonic() - t0 < 20  # detached: returns without waiting for the runs

    # one process that returns when the job ends, rather than a `bench status` process every second
    bench("logs", "night-1", "--address", url, "--follow", env=env, cwd=tmp_path, timeout=90)
    status = None
    while time.monotonic() - t0 < 90:
        st = bench("status", "night-1", "--address", url, "--json", env=env, cwd=tmp_path)
        assert st.returncode == 0, st.stderr
        (status,) = json.loads(st.stdout)
        if status["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    logs = bench("logs", "night-1", "--address", url, env=env, cwd=tmp_path)
    assert status["status"] == "SUCCEEDED", (status, logs.stdout[-4000:])
    assert (status["job"], status["suite_run_id"]) == ("night-1", "night-1") and status["end_time"]
    assert logs.returncode == 0 and "2 rows written, 0 failed" in logs.stdout, logs.stdout[-4000:]
    rows = read_results(str(tmp_path / "res")).to_pylist()  # written by the job, where the client said
    assert sorted(r["mode"] for r in rows) == ["gpu", "ssd"] and {r["suite_run_id"] for r in rows} == {"night-1"}
    assert all(r["status"] == "ok" and r["decode_tok_s"] > 0 for r in rows), [r["error"] for r in rows]

    listing = bench("status", "--address", url, "--json", env=env, cwd=tmp_path)
    assert [j["job"] for j in json.loads(listing.stdout)] == ["night-1"]  # only streambench jobs
    table = bench("status", "--address", url, env=env, cwd=tmp_path)
    assert table.returncode == 0 and "night-1" in table.stdout and "SUCCEEDED" in table.stdout

    # resubmitting the finished suite run resumes it as job night-1.2: nothing left to run
    again = bench("submit", "suite.yaml", "--detach", "--address", url, "--results", "res", "--suite-run-id",
                  "night-1", env=env, cwd=tmp_path)
    assert again.returncode == 0 and "submitted job night-1.2;" in again.stdout, again.stderr
    followed = bench("logs", "night-1.2", "--address", url, "--follow", env=env, cwd=tmp_path)
    assert followed.returncode == 0 and "0 rows written, 0 failed, 2 already recorded" in followed.stdout, \
        followed.stdout[-4000:]
    assert read_results(str(tmp_path / "res")).num_rows == 2


def one_line_error(done: subprocess.CompletedProcess, start: str) -> None:
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith(start), done.stderr


def test_bad_job_requests_are_one_line_exit_2(head, tmp_path):
    url, env = head
    one_line_error(bench("status", "no-such-job", "--address", url, env=env, cwd=tmp_path),
                   f"error: no job 'no-such-job' at {url}; `bench status` lists")
    one_line_error(bench("logs", "no-such-job", "--follow", "--address", url, env=env, cwd=tmp_path),
                   f"error: no job 'no-such-job' at {url}")
    t0 = time.monotonic()
    dead = f"http://127.0.0.1:{closed_port()}"
    one_line_error(bench("submit", "--detach", "--address", dead, env=env, cwd=tmp_path),
                   f"error: cannot reach the Ray dashboard at {dead} (")
    assert time.monotonic() - t0 < 20
    # the auth-token trap: a client that turned token auth off gets told what to do
    no_token = {**env, "RAY_AUTH_MODE": "disabled"}
    done = bench("status", "--address", url, env=no_token, cwd=tmp_path)
    one_line_error(done, f"error: the Ray dashboard at {url} requires the cluster's auth token; ")
    assert "RAY_AUTH_MODE=token" in done.stderr
