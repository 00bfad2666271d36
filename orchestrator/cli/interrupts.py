"""Ctrl-C for the command line: the first press interrupts; later presses are ignored while the process
winds down (Ray's shutdown, the embedded cluster's reaping, atexit handlers); and a press that Python could
only deliver inside a callback whose exceptions it discards (a weakref callback of importlib's module locks,
a `__del__`) is delivered again to the main thread instead of being lost.

Python's default handler raises KeyboardInterrupt on every press, wherever the main thread is: a second
press that landed in such a callback printed "Exception ignored … Traceback" over the clean "aborted"
(seen in CI), and a first press that landed there was swallowed, so the suite ran on.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any


def _press(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # one interrupt per process: the rest is winding down
    raise KeyboardInterrupt


def _press_again(main: int) -> None:
    time.sleep(0.01)
    signal.pthread_kill(main, signal.SIGINT)


def _redeliver(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    def unraisable(info: Any) -> None:
        if not isinstance(info.exc_value, KeyboardInterrupt):
            hook(info)
            return
        # `_press` raises once, so this was the one interrupt and it went nowhere: re-arm and press again
        # from a thread, so that the main thread takes it after this hook returns (a press from here would
        # run the handler inside the hook, where it is discarded again) and wakes from a blocking call
        signal.signal(signal.SIGINT, _press)
        threading.Thread(target=_press_again, args=(threading.main_thread().ident,), daemon=True).start()

    return unraisable


def install() -> None:
    """Take over SIGINT for this process (main thread only, as `signal` requires)."""
    signal.signal(signal.SIGINT, _press)
    sys.unraisablehook = _redeliver(sys.unraisablehook)
