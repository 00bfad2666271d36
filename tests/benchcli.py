"""How tests run the `bench` command: the installed `cli` module under this interpreter, so no PATH
entry or virtual-environment location is assumed (a clean CI machine has neither).

`bench` starts a real process: for what only a process shows (its exit status, what reaches its
stderr, signals, sockets, start-up). `bench_inprocess` runs the same entry point in the test's own
process and returns the same CompletedProcess, without the interpreter start and the imports (torch,
transformers: seconds each time): for what a command says and does, bad input above all.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

BENCH = [sys.executable, "-c", "import cli; cli.main()"]


def interruptible(code: str) -> list[str]:
    """`python -c code` where Ctrl-C (SIGINT) raises KeyboardInterrupt, as in a terminal. A test runner
    started with SIGINT ignored (a background job of a script: `pytest &`) passes that on to every child,
    and Python then installs no handler: a test that presses Ctrl-C would see it do nothing."""
    return [sys.executable, "-c", f"import signal; signal.signal(signal.SIGINT, signal.default_int_handler); {code}"]


def bench(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout, **kw)


def bench_inprocess(monkeypatch, capsys, *args: str, env: dict[str, str] | None = None,
                    cwd=None) -> subprocess.CompletedProcess:
    """`bench(*args, env=, cwd=)`, run by the console entry point in this process.

    As in a fresh process: `env` replaces the whole environment and `cwd` the directory for the call
    only; Python warnings are shown on stderr (pytest would record them instead), each once per call;
    the logging set-up the command makes is undone afterwards, so later tests see pytest's own."""
    import cli

    capsys.readouterr()  # what the test printed before is not the command's output
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    code = 0
    with monkeypatch.context() as m, warnings.catch_warnings():
        m.setattr(sys, "argv", ["bench", *args])
        if env is not None:
            for key in list(os.environ):
                m.delenv(key)
            for key, value in env.items():
                m.setenv(key, value)
        if cwd is not None:
            m.chdir(cwd)
        _python_default_warnings()
        try:
            cli.main()
        except SystemExit as e:  # as the interpreter takes it: None is 0, a message is printed and is 1
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        finally:
            root.handlers[:], root.level = handlers, level
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["bench", *args], code, out.out, out.err)


def _python_default_warnings() -> None:
    """The warning filters of a fresh `python` (not pytest's), printed to stderr as Python prints them."""
    warnings.resetwarnings()
    for action, category in (("ignore", ResourceWarning), ("ignore", ImportWarning),
                             ("ignore", PendingDeprecationWarning), ("ignore", DeprecationWarning)):
        warnings.simplefilter(action, category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show


def one_line_exit_2(r: subprocess.CompletedProcess, *expected: str) -> None:
    """The bad-input promise: exit 2, one `error:` line naming each of `expected`, no traceback."""
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    flat = " ".join(lines[0].split())
    for e in expected:
        assert e in flat, flat
