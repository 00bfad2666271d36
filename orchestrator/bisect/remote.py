"""One run of one point at one commit, on the host Ray placed it: the code `bench bisect` ships.

Standard library only, and pickled by value (`ray.cloudpickle.register_pickle_by_value`): it runs in
the commit's own tree (Ray's `working_dir`, also the task's current directory), where this project's
modules may be missing or different, so nothing here may be imported from the project by reference.
It runs that commit's `bench run` as a child process in the tree (`python -c "import cli; cli.main()"`:
the tree comes first on sys.path, so the commit's own `cli` and `worker` are what runs), after
making a preset model with that commit's `bench make-model` when the cache of this host lacks it.
Everything that goes wrong becomes {"status": "failed", "error": <the last line it printed>}.
`node_report`, the one exception to "standard library only", reads a host before any run (below).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

MAX_ERROR_CHARS = 2000
CLI = "import cli; cli.main()"


class RunFailed(Exception):
    """A run that produced no result; the message is the row's error."""


def run_point(flags: list[str], model: dict[str, Any], cache_dir: str, timeout_s: float) -> dict[str, Any]:
    """`bench run --checkpoints <model> <flags>` in the current directory (the commit's tree).

    `model`: {"path": ...} or {"preset", "layers", "dtype", "seed", "overrides", "cache_name"}.
    Returns status, error, result (the run's JSON document), started_at, finished_at, hostname."""
    started = time.time()
    tree = os.getcwd()
    try:
        checkpoint = checkpoint_for(model, cache_dir, tree, timeout_s)
        result, error = bench_run(tree, checkpoint, flags, timeout_s), None
    except RunFailed as e:
        result, error = None, str(e)[:MAX_ERROR_CHARS]
    return {"status": "ok" if result is not None else "failed", "error": error, "result": result,
            "started_at": started, "finished_at": time.time(), "hostname": socket.gethostname()}


def bench_run(tree: str, checkpoint: str, flags: list[str], timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-bisect-") as tmp:
        out = os.path.join(tmp, "result.json")
        _bench(tree, ["run", "--checkpoints", checkpoint, *flags, "--out-json", out], timeout_s, "bench run")
        try:
            with open(out) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise RunFailed(f"bench run wrote no readable result JSON ({e})") from None


def checkpoint_for(model: dict[str, Any], cache_dir: str, tree: str, timeout_s: float) -> str:
    """The checkpoint directory on this host: the model's path, or its preset made once into the cache
    (the layout of the actors' cache, so either can reuse what the other made)."""
    if model.get("path"):
        if not Path(model["path"], "config.json").is_file():
            raise RunFailed(f"no checkpoint at {model['path']} on this host (config.json missing)")
        return model["path"]
    target = Path(cache_dir) / "models" / model["cache_name"]
    done = target / ".complete"
    if done.is_file():
        return str(target / done.read_text().strip())
    overrides = dict(model.get("overrides") or {})
    tie = bool(overrides.pop("tie_word_embeddings", False))
    if overrides:
        raise RunFailed(f"preset overrides {sorted(overrides)} cannot be made with `bench make-model`; make the model "
                        f"once with `bench submit` on this host (it caches it under {target})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    args = ["make-model", str(tmp), "--preset", model["preset"], "--dtype", model["dtype"], "--seed", str(model["seed"])]
    args += ["--layers", str(model["layers"])] if model.get("layers") else []
    args += ["--tie-embeddings"] if tie else []
    try:
        _bench(tree, args, timeout_s, "bench make-model")
        configs = sorted(tmp.rglob("config.json"))
        if not configs:
            raise RunFailed("bench make-model wrote no config.json")
        rel = configs[0].parent.relative_to(tmp).as_posix()
        (tmp / ".complete").write_text(rel or ".")
        os.rename(tmp, target)
    except OSError:
        if not done.is_file():  # lost a race to another run making the same model: use theirs
            raise RunFailed(f"could not put the model into {target}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target / done.read_text().strip())


def _bench(tree: str, args: list[str], timeout_s: float, what: str) -> None:
    try:
        done = subprocess.run([sys.executable, "-c", CLI, *args], cwd=tree, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"{what} timed out after {timeout_s:g} s") from None
    except OSError as e:
        raise RunFailed(f"{what} could not start: {e}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
        raise RunFailed(f"{what} exited {done.returncode}: {lines[-1] if lines else 'no output'}")


def node_report(nvme: str | None) -> dict[str, Any]:
    """What the driver needs to know about a slot before it runs anything there: the host's fingerprint
    and hardware key, as the slot's actor would take them (same GPUs visible), and its cache directory.
    Unlike `run_point` this runs without a working_dir, through the engine installed on the node (the
    one `bench hosts` and `bench submit` use), so it imports it here rather than at the top."""
    from worker import envs
    from worker.host import hostinfo

    fp = hostinfo.host_fingerprint(nvme)
    return {"fingerprint": fp, "hardware_key": hostinfo.hardware_key(fp), "cache_dir": envs.cache_dir()}
