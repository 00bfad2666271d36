"""A suite run id belongs to one live submit at a time.

Two `bench submit --suite-run-id X` at once both ran every point and the last writer won. The
results store is the one place every submitter of a suite run shares (a local directory or a
bucket), so the claim lives there: `<results>/_running/<suite_run_id>.json` names the holder (host,
pid, since) and a heartbeat the holder refreshes while it runs. A second submit refuses a claim
whose heartbeat is fresh; a claim left by a killed submit goes stale and is taken over. On the
holder's own host a driver-local `flock` closes the race of two submits starting at the same
instant. Dataset readers skip `_running/` (names starting with `_` are not data to pyarrow).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from typing import Iterator

import pyarrow.fs as pafs

from orchestrator.results.store import open_uri
from worker.errors import UserError
from worker.host import devlock

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = 6 * HEARTBEAT_S  # a claim not refreshed this long belongs to a dead submit
LEASE_DIR = "_running"


@contextlib.contextmanager
def claim(results_uri: str, suite_run_id: str) -> Iterator[None]:
    """Hold `suite_run_id` for the block, or raise a UserError naming the live submit holding it."""
    with devlock.hold([f"suite-run-{suite_run_id}"], wait_s=0, what="submit"):
        fs, base = open_uri(results_uri)
        path = f"{base}/{LEASE_DIR}/{suite_run_id}.json"
        other = _live_claim(fs, path)
        if other is not None:
            raise UserError(f"suite run {suite_run_id} is being run by another submit ({_describe(other)}); wait "
                            "for it to finish, or give this one another --suite-run-id")
        stop = threading.Event()
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        _write(fs, path, me)
        beat = threading.Thread(target=_heartbeat, args=(fs, path, me, stop), name="lease-heartbeat", daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join(timeout=5)
            with contextlib.suppress(OSError, FileNotFoundError):
                fs.delete_file(path)


def _live_claim(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            doc = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    age = time.time() - float(doc.get("heartbeat", 0))
    if age > STALE_S:
        log.info("taking over the stale claim of suite run %s (%s, last heartbeat %.0f s ago)", path, _describe(doc),
                 age)
        return None
    return doc


def _write(fs: pafs.FileSystem, path: str, me: dict) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps({**me, "heartbeat": time.time()}).encode())


def _heartbeat(fs: pafs.FileSystem, path: str, me: dict, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            _write(fs, path, me)
        except OSError as e:  # a flaky store must not stop the suite; the claim may go stale
            log.warning("could not refresh the claim on %s: %s", path, e)


def _describe(doc: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc.get("since", 0)))
    return f"pid {doc.get('pid')} on {doc.get('host')} since {since}"
