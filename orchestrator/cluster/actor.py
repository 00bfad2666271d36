"""The Ray side of one run: a plain worker class (testable without Ray), made remote by the scheduler.

One `BenchWorker` lives on one slot, a (host, GPU, NVMe device) triple; Ray's resources make sure two
actors never hold the same GPU or NVMe device. `run(spec)` materialises the spec's model on this host,
calls the engine (`worker.run.run`) and always returns a `RunOutcome`: a bad config or an engine
error becomes a failed outcome with its reason; only the death of the actor or its node surfaces as a
Ray error, which the scheduler retries. Phases flow back through a tiny `PhaseBoard` actor so the
driver can show what each run is doing without waiting for it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from orchestrator.suite.spec import ModelSpec, RunSpec, stable_hash
from worker import envs
from worker.errors import UserError
from worker.host import hostinfo
from worker.host.bytecode import use_bytecode_cache

log = logging.getLogger(__name__)

RunFn = Callable[..., dict]  # worker.run.run(cfg, on_phase=...) -> result dict
MAX_ERROR_CHARS = 2000


@dataclass
class RunOutcome:
    """What came back from one attempt (the row is built from it and the spec)."""

    status: str  # "ok" | "failed"
    error: str | None
    result: dict[str, Any] | None
    fingerprint: dict[str, Any] | None
    node_id: str | None
    started_at: float | None
    finished_at: float | None
    git_commit: str | None = None
    git_dirty: bool | None = None
    attempts: int = 1


class BenchWorker:
    """Runs specs on this host, one at a time, on the slot's GPU and NVMe device."""

    def __init__(self, nvme: str | None = None, node_id: str | None = None, board: Any = None,
                 run_fn: RunFn | None = None):
        envs.apply_base_process_env()  # before anything imports torch in this process
        use_bytecode_cache()  # likewise (worker/host/bytecode.py)
        self.nvme = nvme
        self.node_id = node_id
        self.board = board
        self.run_fn = run_fn
        self.fingerprint = hostinfo.host_fingerprint(nvme)
        self.git = (hostinfo.git_commit(), hostinfo.git_dirty())  # once: `git status` is not free
        self.reuse = None  # an EngineCache while the runs ask for `reuse: weights`

    def run(self, spec: RunSpec) -> RunOutcome:
        started = time.time()
        self._phase(spec.run_id, "start")
        try:
            cfg = spec.config(materialise(spec.model))
            cfg = _with_device(cfg, self.nvme, spec)
            result = self._run_fn()(cfg, on_phase=lambda name: self._phase(spec.run_id, name), **self._reuse(spec))
            status, error = "ok", None
        except UserError as e:
            result, status, error = None, "failed", str(e)
        except Exception as e:  # an engine bug or OOM: the row says what, the worker log has the trace
            log.error("run %s failed:\n%s", spec.run_id, traceback.format_exc())
            result, status, error = None, "failed", f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
        self._phase(spec.run_id, status)
        return RunOutcome(status, error, result, self.fingerprint, self.node_id, started, time.time(), *self.git)

    def close(self) -> None:
        """Free a kept engine (its memory and device locks); Ray's actor exit does the same."""
        if self.reuse is not None:
            self.reuse.close()
            self.reuse = None

    def _reuse(self, spec: RunSpec) -> dict[str, Any]:
        if spec.reuse != "weights":
            self.close()  # a run that does not reuse builds its own engine: nothing may hold the device
            return {}
        if self.reuse is None:
            from worker.host.reuse import EngineCache

            self.reuse = EngineCache()
        return {"reuse": self.reuse}

    def info(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "node_id": self.node_id, "pid": os.getpid()}

    def _run_fn(self) -> RunFn:
        if self.run_fn is None:
            from worker.run import run

            self.run_fn = run
        return self.run_fn

    def _phase(self, run_id: str, name: str) -> None:
        if self.board is not None:
            self.board.set.remote(run_id, name)  # fire and forget: progress must never slow a run


class PhaseBoard:
    """The current phase of each run, written by workers, read by the driver's live display."""

    def __init__(self) -> None:
        self.phases: dict[str, str] = {}

    def set(self, run_id: str, phase: str) -> None:
        self.phases[run_id] = phase

    def snapshot(self) -> dict[str, str]:
        return dict(self.phases)


def materialise(model: ModelSpec) -> str:
    """A checkpoint directory for the model on this host: its path, or a preset made once into the cache.

    Presets are built into a temp dir and renamed into place, so concurrent actors on one host never
    see half a model; the loser of a race discards its copy.
    """
    if model.path is not None:
        if not Path(model.path, "config.json").is_file():
            raise UserError(f"model {model.name}: no checkpoint at {model.path} on this host (config.json missing)")
        return model.path
    from worker.synth.checkpoints import make_model

    target = Path(envs.cache_dir()) / "models" / f"{model.preset}-{stable_hash(model.identity())[:10]}"
    done = target / ".complete"
    if done.is_file():
        return str(target / done.read_text().strip())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    made = Path(make_model(tmp, preset=model.preset, layers=model.layers, dtype=model.dtype, seed=model.seed,
                           overrides=model.overrides))
    rel = made.resolve().relative_to(tmp.resolve()).as_posix()
    (tmp / ".complete").write_text(rel or ".")
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not done.is_file():
            raise
    return str(target / done.read_text().strip())


def _with_device(cfg, nvme: str | None, spec: RunSpec):
    """Fill `{nvme}` in string settings (e.g. `raw_device: /dev/{nvme}`) with this slot's device."""
    flat = cfg.to_flat()
    uses = {k: v for k, v in flat.items() if isinstance(v, str) and "{nvme}" in v}
    if not uses:
        return cfg
    if nvme is None:
        raise UserError(f"{', '.join(uses)} use {{nvme}} but this host advertises no NVMe device "
                        "(start Ray with --resources '{\"nvme:DEV\": 1}')")
    return type(cfg).from_flat({k: v.replace("{nvme}", nvme) for k, v in uses.items()}, base=cfg,
                               where=f"suite {spec.suite}: run {spec.run_id}")
