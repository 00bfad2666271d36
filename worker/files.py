"""Writing outputs without harm: every file a command writes goes through here.

`write_atomic` writes a temp file beside the target and renames it over the target, so a reader
never sees half a file and a failed write leaves nothing. A rename replaces whatever the name points
at, so it refuses a target that exists and is not a regular file (a device node given as an output
was once replaced by a JSON file). `check_output_file` runs before any work: a run or report whose
result could not land (a directory in the way, no permission, a read-only or full disk) fails at once,
in one line, not after the measurement.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from worker.errors import UserError

PROBE_BYTES = 1 << 20  # more than a run's JSON: a disk that takes this takes the result


def _target(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory: give a file name")
    if path.exists() and not path.is_file():
        raise UserError(f"{what} {path} exists and is not a regular file; give a file name")
    return path


def check_output_file(path: str | os.PathLike, what: str) -> None:
    """Can a file be written at `path`? A UserError naming `what` (the flag) when not."""
    path = _target(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{what} {path} cannot be written ({e.strerror or e}); choose another location") from None


def write_atomic(path: str | os.PathLike, data: str | bytes, what: str = "output", fsync: bool = False) -> Path:
    """Write `data` to `path` whole or not at all (`fsync`: durable before the rename, for files
    whose loss would be silent, like a manifest)."""
    path = _target(path, what)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UserError(f"cannot write {what} {path} ({e.strerror or e}); nothing was written there") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path
