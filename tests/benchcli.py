"""How tests run the `bench` command: the installed `cli` module under this interpreter, so no PATH
entry or virtual-environment location is assumed (a clean CI machine has neither)."""

from __future__ import annotations

import subprocess
import sys

BENCH = [sys.executable, "-c", "import cli; cli.main()"]


def bench(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout, **kw)
