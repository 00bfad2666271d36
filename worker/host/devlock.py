"""One engine per device on a host, whatever started it: a lock per GPU and per disk.

Two `bench submit` at once each start their own embedded Ray, and two `bench run` know nothing of
each other: without a lock both engines run on the same GPU and disk and each row reports numbers
the other one spoiled. The lock is a file per device in one host-wide directory (`envs.lock_dir()`),
held with `flock` for as long as the engine lives: the kernel drops it when the process dies, however
it dies, so a crash never leaves a stale lock. The file names its holder (pid, host, command, since
when) for the message the next engine prints while it waits.

Device keys: a GPU by its UUID (the same physical card whatever CUDA_VISIBLE_DEVICES says), a CPU
compute device as `cpu`, a disk by the device number holding the pack's blob (a raw block device by
its own). Locks are taken in sorted order, so two engines wanting the same two devices cannot deadlock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from worker import envs
from worker.errors import UserError

log = logging.getLogger(__name__)

POLL_S = 0.25


@dataclass
class Held:
    """What a run held and how long it waited for it (recorded in the run's result)."""

    keys: list[str]
    waited_s: float = 0.0
    acquired_at: float | None = None
    released_at: float | None = None
    waited_for: list[dict] = field(default_factory=list)  # the holders it waited behind
    released_early: dict[str, float] = field(default_factory=dict)  # key → when it was given back
    _files: dict[str, Any] = field(default_factory=dict, repr=False)

    def release(self, key: str) -> None:
        """Give one device back before the others: a disk the engine no longer reads (its weights are
        in memory) may serve the next engine's fill while this one measures on its GPU."""
        f = self._files.pop(key, None)
        if f is not None:
            f.close()
            self.released_early[key] = time.time()

    def to_dict(self) -> dict:
        return {"keys": self.keys, "waited_s": self.waited_s, "acquired_at": self.acquired_at,
                "released_at": self.released_at, "waited_for": self.waited_for,
                "released_early": dict(self.released_early)}


def device_key(device) -> str:
    """The lock key of a torch compute device: a GPU by its UUID (index as a fallback where torch
    has no UUID), the CPU as `cpu`."""
    if device.type != "cuda":
        return "cpu"
    import torch

    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    return f"gpu-{uuid}" if uuid else f"gpu-index{device.index}"


def disk_key(path: str | os.PathLike) -> str:
    """The lock key of the disk holding `path` (a raw block device is its own disk)."""
    st = os.stat(path)
    dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    return f"disk-{os.major(dev)}:{os.minor(dev)}"


@contextlib.contextmanager
def hold(keys: list[str], wait_s: float, what: str = "engine") -> Iterator[Held]:
    """Hold every device of `keys` for the block, waiting up to `wait_s` seconds for each one; a
    UserError names the holder when the wait runs out. (`what` holds them: an "engine", a "submit".)"""
    held = Held(sorted(set(keys)))
    t0 = time.monotonic()
    try:
        for key in held.keys:
            held._files[key] = _acquire(key, t0 + wait_s, held, what)
        held.waited_s = time.monotonic() - t0
        held.acquired_at = time.time()
        yield held
    finally:
        for f in held._files.values():
            f.close()  # closing the fd drops the flock
        held._files.clear()
        held.released_at = time.time()


def _acquire(key: str, deadline: float, held: Held, what: str):
    f = _open(key)
    told = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                f.close()
                raise
        holder = _holder(f)
        if time.monotonic() >= deadline:
            f.close()
            if what != "engine":
                raise UserError(f"{_what(key)} is in use by another {what} ({_describe(holder)})")
            raise UserError(f"{_what(key)} is in use by another engine ({_describe(holder)}); wait for it to finish "
                            "or raise --device-wait-s (two engines on one device would spoil both rows)")
        if not told:
            log.warning("waiting for %s: in use by %s", _what(key), _describe(holder))
            held.waited_for.append({"key": key, **holder})
            told = True
        time.sleep(POLL_S)
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                        "command": " ".join(sys.argv)[:300]}))
    f.flush()
    return f


def _open(key: str):
    """The lock file of `key`, created readable and writable by every user of the host."""
    directory = Path(envs.lock_dir())
    try:
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                os.chmod(directory, 0o1777)  # every user's engines share it, as /tmp itself (umask aside)
        fd = os.open(directory / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"cannot use the device lock directory {directory} ({e.strerror}); make it writable for "
                        "every user of this host or set STREAMBENCH_LOCK_DIR") from None
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)  # whoever created it, every user of the host must be able to take it
    return os.fdopen(fd, "r+")


def _holder(f) -> dict:
    try:
        f.seek(0)
        doc = json.loads(f.read() or "{}")
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _what(key: str) -> str:
    kind, _, name = key.partition("-")
    if key.startswith("suite-run-"):
        return f"suite run {key.removeprefix('suite-run-')}"
    return {"gpu": f"GPU {name}", "disk": f"disk {name}"}.get(kind, "the CPU" if key == "cpu" else key)


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {since}: {holder.get('command', '?')}"
