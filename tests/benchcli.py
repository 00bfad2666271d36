"""How tests run the `bench` command: the installed `cli` module under this interpreter, so no PATH
entry or virtual-environment location is assumed (a clean CI machine has neither)."""

from __future__ import annotations

import subprocess
import sys

BENCH = [sys.executable, "-c", "import cli; cli.main()"]


def bench(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout, **kw)


def bench_inprocess(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the console entry point in this process (no interpreter start-up): exit code, stdout, stderr."""
    import sys

    import cli

    monkeypatch.setattr(sys, "argv", ["bench", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_exit_2(r: subprocess.CompletedProcess, *expected: str) -> None:
    """The bad-input promise: exit 2, one `error:` line naming each of `expected`, no traceback."""
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    flat = " ".join(lines[0].split())
    for e in expected:
        assert e in flat, flat
