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
