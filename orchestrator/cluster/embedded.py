"""The embedded local Ray of `bench submit` without an address: loopback only, token auth, quiet,
and nothing left behind.

- Loopback only. Ray rewrites a 127.0.0.1 node address to the machine's routable one unless it runs
  in its single-machine mode (`ray_constants.ENABLE_RAY_CLUSTER` false: the macOS and Windows default,
  on Linux `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`). In that mode GCS, raylet, the driver's and workers'
  gRPC servers, the dashboard and runtime-env agents and the monitor's, dashboard's and agent's
  Prometheus endpoints all bind 127.0.0.1 (tests/test_embedded_ray.py reads the socket table). Ray
  reads the setting when it is imported: the variable goes into the environment its processes
  inherit, and the constant is set in this process, which may have imported Ray already.
- Token authentication stays on (`RAY_AUTH_MODE=token`, the token generated on first use): gRPC and
  the agents' HTTP require it. The metrics endpoints do not; they answer on 127.0.0.1 only.
- Quiet: with the mode chosen, Ray prints no token banner; its loggers and the workers' output stay
  out of the default output (`-v DEBUG` shows them; the session logs keep them).
- Nothing left behind. A driver interrupted early (Ctrl-C during start-up, or twice in a row) left
  `ray::DashboardAgent` / `ray::RuntimeEnvAgent` running for a minute: they wait 60 s on a GCS that is
  gone. Every process of this Ray carries the owner mark in its environment; after shutdown, any
  still alive is terminated, then killed. A second Ctrl-C cannot cut the clean-up short.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import uuid
from typing import Iterator

from worker import envs

log = logging.getLogger(__name__)

NAMESPACE = "streambench"
GRACE_S = 3.0
QUIET_LOGGERS = ("ray",)


@contextlib.contextmanager
def embedded_ray() -> Iterator[str]:
    """Start the embedded Ray for the block; stop it and everything it started afterwards."""
    import ray

    owner = envs.embedded_ray_owner() or uuid.uuid4().hex
    envs.prepare_embedded_ray(owner)
    from ray._private import ray_constants
    from ray._raylet import Config

    ray_constants.ENABLE_RAY_CLUSTER = False  # what the variable says, for a Ray imported before it was set
    Config.initialize("")  # this process's cached Ray config re-reads RAY_AUTH_MODE (its GCS client needs the token)
    verbose = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    log.info("no --address or RAY_ADDRESS: starting an embedded local Ray; it listens on 127.0.0.1 only "
             "(token authentication on; Prometheus metrics unauthenticated, on loopback)")
    try:
        ray.init(address="local", include_dashboard=False, namespace=NAMESPACE, _node_ip_address="127.0.0.1",
                 configure_logging=False, log_to_driver=verbose)
        yield "embedded local Ray (127.0.0.1 only)"
    finally:
        with _no_interrupts():
            with contextlib.suppress(Exception):
                ray.shutdown()
            left = reap(owner)
            if left:
                log.warning("embedded Ray: %d process(es) would not stop: %s", len(left), left)


def owned(owner: str) -> list[int]:
    """Pids of the processes (other than this one) whose environment carries the owner mark."""
    mark = f"{envs.EMBEDDED_RAY_MARK}={owner}".encode()
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    out.append(int(entry))
        except OSError:  # gone, or another user's
            continue
    return out


def reap(owner: str, grace_s: float = GRACE_S) -> list[int]:
    """Terminate, then kill, what is left of the embedded Ray; returns the pids still alive."""
    pids = owned(owner)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = [p for p in pids if _alive(p)]
        if not pids:
            break
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"  # a zombie has stopped: only its parent can reap it
    except (OSError, IndexError):
        return False


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Ctrl-C during the clean-up is noted, not obeyed: the clean-up finishes, then the press goes to the
    handler outside (raised as KeyboardInterrupt; nothing where SIGINT is ignored there)."""
    hits = []
    try:
        old = signal.signal(signal.SIGINT, lambda *_: hits.append(1))
    except ValueError:  # not the main thread: nothing to shield
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if hits and callable(old):
        old(signal.SIGINT, None)  # the press as the handler outside would have taken it (the CLI's: once)
    elif hits and old != signal.SIG_IGN:
        raise KeyboardInterrupt
