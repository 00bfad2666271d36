"""Connecting to Ray: an existing cluster (--address / RAY_ADDRESS) or an embedded local one.

Three traps are handled here so users never wait on them:
- an unreachable address makes `ray.init` retry for minutes: a 3-second TCP check fails first, with
  one line that says what to do;
- `ray.init()` without an address silently reuses a stale /tmp/ray/ray_current_cluster: the embedded
  Ray is started with address="local", bound to 127.0.0.1, without a dashboard, and shut down after;
- token authentication (RAY_NOTES.md): once ~/.ray/auth_token exists, clusters started with
  `ray start` require it, and a client without RAY_AUTH_MODE=token fails after ~20 s with a bare
  ConnectionError. We turn token mode on when a token is available (a token-mode client also talks
  to clusters without auth), and explain the fixes when the connection still fails.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Iterator

from worker import envs
from worker.errors import UserError

log = logging.getLogger(__name__)

NAMESPACE = "streambench"
CONNECT_CHECK_S = 3.0
DEFAULT_GCS_PORT = 6379
DEFAULT_CLIENT_PORT = 10001

NO_CLUSTER_HINT = ("start one with `ray start --head --resources '{\"nvme:DEV\": 1}'` or leave out "
                   "--address/RAY_ADDRESS to run on an embedded local Ray")
AUTH_HINT = ("if the cluster uses token authentication (Ray writes ~/.ray/auth_token on first use), run with "
             "RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token (or RAY_AUTH_TOKEN), or use "
             "--address auto on the head node, or start the head with RAY_AUTH_MODE=disabled")


def resolve_address(address: str | None) -> str | None:
    """--address, else RAY_ADDRESS, else None (embedded local Ray)."""
    return address or envs.ray_address()


def check_reachable(address: str, timeout_s: float = CONNECT_CHECK_S) -> None:
    """Fail fast, in one line, when nothing listens at a host:port address."""
    if address in ("auto", "local"):
        return
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise UserError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); {NO_CLUSTER_HINT}") from None


def split_address(address: str) -> tuple[str, int]:
    scheme, _, rest = address.rpartition("://")
    default = DEFAULT_CLIENT_PORT if scheme == "ray" else DEFAULT_GCS_PORT
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep:
        return rest, default
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise UserError(f"--address {address!r}: expected HOST:PORT (e.g. 10.0.0.5:6379)") from None


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[str]:
    """Connect for the duration of the block; yields a description of where we run.

    Reuses an existing connection of this process (tests, `bench` inside a Ray Job) and leaves it open.
    """
    import ray

    if ray.is_initialized():
        yield "connected Ray"
        return
    address = resolve_address(address)
    if address is None:
        log.info("no --address or RAY_ADDRESS: starting an embedded local Ray on 127.0.0.1")
        ray.init(address="local", include_dashboard=False, namespace=NAMESPACE, _node_ip_address="127.0.0.1",
                 configure_logging=False, log_to_driver=True)
        where = "embedded local Ray"
    else:
        check_reachable(address)
        prefer_token_auth()
        try:
            ray.init(address=address, namespace=NAMESPACE, configure_logging=False, log_to_driver=True)
        except ConnectionError as e:
            hint = NO_CLUSTER_HINT if "Could not find any running Ray instance" in str(e) else AUTH_HINT
            raise UserError(f"could not connect to the Ray cluster at {address} ({e}); {hint}") from None
        where = f"Ray cluster at {address}"
    try:
        yield where
    finally:
        ray.shutdown()


def prefer_token_auth() -> bool:
    """Connect in token mode when a token is available and the user did not choose a mode.

    Uses Ray's own check (token file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH), which also refreshes Ray's
    cached config; setting the variable alone is too late once `ray` is imported.
    """
    if envs.ray_auth_mode() is not None:
        return envs.ray_auth_mode() == "token"
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # a Ray without token authentication
        return False
    quiet = logging.getLogger(maybe_enable_token_auth_if_token_available.__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "enabled for this Ray cluster" warning is meant for cluster starts
    try:
        enabled = maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)
    if enabled:
        log.debug("a Ray auth token is available: connecting with RAY_AUTH_MODE=token")
    return enabled
