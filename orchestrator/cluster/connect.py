"""Connecting to Ray: an existing cluster (--address / RAY_ADDRESS) or an embedded local one.

Four traps are handled here so users never wait on them:
- an unreachable address makes `ray.init` retry for minutes: a 3-second TCP check fails first, with
  one line that says what to do;
- a server at the address that is not Ray (an HTTP server, say) passes a TCP check and then Ray
  retries for minutes: an HTTP/2 handshake tells within seconds, and the error says what answered;
- `ray.init()` without an address silently reuses a stale /tmp/ray/ray_current_cluster: the embedded
  Ray (orchestrator.cluster.embedded) is started with address="local", loopback only, and shut down after;
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

from orchestrator.cluster.embedded import NAMESPACE, embedded_ray
from worker import envs
from worker.errors import UserError

log = logging.getLogger(__name__)

CONNECT_CHECK_S = 3.0
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # + an empty SETTINGS
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


def check_speaks_grpc(address: str, timeout_s: float = CONNECT_CHECK_S) -> None:
    """Ray's GCS (and the Ray Client server) speak gRPC, i.e. HTTP/2: a server that answers the HTTP/2
    connection preface with anything but a SETTINGS frame is not Ray, and `ray.init` would retry
    against it for minutes. Say what answered, in one line, within seconds."""
    if address in ("auto", "local"):
        return
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(HTTP2_PREFACE)
            s.settimeout(timeout_s)
            reply = s.recv(64)
    except TimeoutError:
        raise UserError(f"{address} accepts connections but did not answer the gRPC handshake within "
                        f"{timeout_s:g} s: it is not a Ray cluster's GCS port (6379 by default); {NO_CLUSTER_HINT}") from None
    except OSError as e:
        raise UserError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); {NO_CLUSTER_HINT}") from None
    if len(reply) >= 9 and reply[3] == 4:  # a frame header whose type is SETTINGS: an HTTP/2 server
        return
    what = reply.splitlines()[0].decode("latin-1", "replace")[:80] if reply.strip() else "nothing"
    raise UserError(f"{address} is not a Ray cluster: it does not speak gRPC (it answered {what!r}); give the "
                    f"head's GCS address (HOST:6379), or http://HEAD:8265 for --detach; {NO_CLUSTER_HINT}")


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
    Without an address: the embedded local Ray (orchestrator.cluster.embedded).
    """
    import ray

    if ray.is_initialized():
        yield "connected Ray"
        return
    address = resolve_address(address)
    if address is None:
        with embedded_ray() as where:
            yield where
        return
    check_reachable(address)
    check_speaks_grpc(address)
    prefer_token_auth()
    try:
        ray.init(address=address, namespace=NAMESPACE, configure_logging=False, log_to_driver=True)
    except ConnectionError as e:
        hint = NO_CLUSTER_HINT if "Could not find any running Ray instance" in str(e) else AUTH_HINT
        raise UserError(f"could not connect to the Ray cluster at {address} ({e}); {hint}") from None
    try:
        yield f"Ray cluster at {address}"
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
