"""How tests run the `bench` command: the installed `cli` module under this interpreter, so no PATH
entry or virtual-environment location is assumed (a clean CI machine has neither).

`bench` starts a real process: for what only a process shows (its exit status, what reaches its
stderr, signals, sockets, start-up). `bench_inprocess` runs the same entry point in the test's own
process and returns the same CompletedProcess, without the interpreter start and the imports (torch,
transformers: seconds each time): for what a command says and does, bad input above all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import warnings
from typing import Callable, Iterator

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
    what the command changes in the process is undone afterwards (see `_as_a_process`)."""
    import cli

    capsys.readouterr()  # what the test printed before is not the command's output
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", ["bench", *args])
        if env is not None:
            for key in list(os.environ):
                m.delenv(key)
            for key, value in env.items():
                m.setenv(key, value)
        if cwd is not None:
            m.chdir(cwd)
        with _as_a_process():
            code = _exit_code(cli.main)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["bench", *args], code, out.out, out.err)


@contextlib.contextmanager
def _as_a_process() -> Iterator[None]:
    """Python's own warning filters for the block, and what it changes in this process undone after it,
    as a process's exit would: the environment (a run sets OMP_NUM_THREADS), torch's thread count and
    the root logger (the command's basicConfig(force=True))."""
    root, environ, torch = logging.getLogger(), dict(os.environ), sys.modules.get("torch")
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads() if torch else None
    with warnings.catch_warnings():
        _python_default_warnings()
        try:
            yield
        finally:
            root.handlers[:], root.level = handlers, level
            os.environ.clear()
            os.environ.update(environ)
            if threads is not None:
                torch.set_num_threads(threads)


def _exit_code(main: Callable[[], None]) -> int:
    """The exit status `main()` would give a process: SystemExit's code (None is 0; a message is printed
    and is 1), 0 when it returns. Any other exception propagates, as a traceback would end a process."""
    try:
        main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0


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
