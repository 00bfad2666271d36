"""The embedded default Ray, as a user meets it (issue 12, item 2 and Ctrl-C): real `bench submit`
processes, the real socket table.

Every listener of its process tree is on loopback, token authentication is on, Ray prints no banner,
and Ctrl-C, once early or twice in a row, exits 130 and leaves no process of it behind. The tree is
found by the owner mark the embedded Ray puts in every process's environment (the test chooses it).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time
import uuid

import psutil
import pytest

from orchestrator.cluster.embedded import owned

pytestmark = pytest.mark.ray


def start_submit(tiny_ckpt, tmp_path, repeats: int = 3) -> tuple[subprocess.Popen, str]:
    from benchcli import interruptible

    suite = tmp_path / "s.yaml"
    suite.write_text(f"name: s\nmodels: [{{name: t, path: {tiny_ckpt}}}]\nrepeats: {repeats}\n"
                     "defaults: {prompt_len: 8, max_new_tokens: 24, max_seq_len: 64, temperature: 0, roofline: false}\n"
                     "matrix: {mode: [cpu, ssd]}\n")
    owner = uuid.uuid4().hex
    env = {**os.environ, "STREAMBENCH_EMBEDDED_RAY": owner, "STREAMBENCH_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.Popen([*interruptible("import cli; cli.main()"), "submit", str(suite), "--results",
                          str(tmp_path / "res")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=tmp_path)
    return p, owner


def listeners(pids: set[int]) -> list[tuple[int, str, int]]:
    out = []
    for c in psutil.net_connections(kind="inet"):
        listening = c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr)  # TCP listen, unconnected UDP
        if c.pid in pids and listening:
            out.append((c.pid, c.laddr.ip, c.laddr.port))
    return out


def is_loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(a, "ipv4_mapped", None) or a).is_loopback


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in items}


def wait_gone(owner: str, timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := owned(owner)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_the_embedded_ray_listens_on_loopback_only_with_token_auth(tiny_ckpt, tmp_path):
    p, owner = start_submit(tiny_ckpt, tmp_path)
    seen: dict[tuple[int, str, int], str] = {}
    auth: dict[str, str | None] = {}
    try:
        while p.poll() is None:
            pids = set(owned(owner)) | {p.pid}
            for pid, ip, port in listeners(pids):
                try:
                    seen[(pid, ip, port)] = name = psutil.Process(pid).name()
                    if name in ("gcs_server", "raylet"):  # (the driver set its variables after it started)
                        auth[name] = environ_of(pid).get("RAY_AUTH_MODE")
                except (psutil.Error, OSError):
                    pass
            time.sleep(0.3)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0, err
    names = {name for name in seen.values()}
    assert {"gcs_server", "raylet"} <= names and len(seen) >= 6, seen  # the socket table was really read
    exposed = {k: v for k, v in seen.items() if not is_loopback(k[1])}
    assert not exposed, exposed
    assert auth == {"gcs_server": "token", "raylet": "token"}  # the servers require the token
    assert "Token authentication is enabled" not in err + out  # no banner for the user of the default
    assert "listens on 127.0.0.1 only" in err
    assert wait_gone(owner) == []


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_exits_130_and_leaves_no_ray_process(tiny_ckpt, tmp_path, presses):
    p, owner = start_submit(tiny_ckpt, tmp_path, repeats=20)
    try:
        deadline = time.monotonic() + 60
        while len(owned(owner)) < 3 and time.monotonic() < deadline:  # Ray is starting: interrupt early
            time.sleep(0.1)
        assert p.poll() is None, p.communicate()
        for i in range(presses):
            p.send_signal(signal.SIGINT)
            time.sleep(0.5)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    assert wait_gone(owner) == []


def test_a_non_ray_server_at_the_address_fails_fast(tmp_path):
    import http.server
    import threading

    from benchcli import bench

    srv = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        r = bench("submit", "--address", f"127.0.0.1:{srv.server_port}", "--results", str(tmp_path / "r"), timeout=60)
        assert time.monotonic() - t0 < 15
        assert r.returncode == 2 and "is not a Ray cluster: it does not speak gRPC" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        srv.shutdown()
