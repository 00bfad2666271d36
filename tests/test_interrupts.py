"""Ctrl-C in the CLI: a press delivered inside a callback whose exceptions Python discards (importlib's
module-lock weakref callbacks, where CI's test_ctrl_c_exits_130…[2] saw it) neither prints a traceback nor
gets lost."""
import subprocess
import sys
import textwrap

import pytest

from orchestrator.cli import interrupts

PRELUDE = """
import os, signal, sys, time, weakref
if sys.argv[1] == "install":
    from orchestrator.cli import interrupts
    interrupts.install()

def in_a_weakref_callback():
    class A: pass
    a = A()
    def cb(_):
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(100000))  # the handler runs here, inside the callback
    r = weakref.ref(a, cb)
    del a
"""

SECOND_PRESS_WHILE_WINDING_DOWN = PRELUDE + """
try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
except KeyboardInterrupt:
    print("interrupted")
in_a_weakref_callback()  # the user presses again during the clean-up
print("wound down")
"""

FIRST_PRESS_IN_A_CALLBACK = PRELUDE + """
try:
    in_a_weakref_callback()
    for _ in range(50):
        time.sleep(0.1)
    print("ran on")
except KeyboardInterrupt:
    print("interrupted")
"""


def run(script: str, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), mode], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize("mode", ["install", pytest.param("default", marks=pytest.mark.xfail(strict=True))])
def test_a_second_press_while_winding_down_is_ignored_without_a_traceback(mode):
    p = run(SECOND_PRESS_WHILE_WINDING_DOWN, mode)
    assert p.returncode == 0 and p.stdout.split() == ["interrupted", "wound", "down"], p
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr


@pytest.mark.parametrize("mode", ["install", pytest.param("default", marks=pytest.mark.xfail(strict=True))])
def test_a_first_press_lost_in_a_callback_is_delivered_again(mode):
    p = run(FIRST_PRESS_IN_A_CALLBACK, mode)
    assert p.stdout.split() == ["interrupted"], p
    assert "Traceback" not in p.stderr, p.stderr


def test_the_clean_up_shield_hands_a_press_to_the_handler_outside_it():
    """`_no_interrupts` re-raises through the CLI's handler (so later presses are ignored) and not at all
    once the CLI ignores SIGINT."""
    import signal

    from orchestrator.cluster.embedded import _no_interrupts

    old = signal.getsignal(signal.SIGINT)
    try:
        interrupts.install()
        with pytest.raises(KeyboardInterrupt), _no_interrupts():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        with _no_interrupts():  # a press during the rest of the clean-up: noted, not raised
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, old)
        sys.unraisablehook = sys.__unraisablehook__
