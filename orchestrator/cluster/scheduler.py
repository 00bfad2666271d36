"""Run a plan of RunSpecs over the cluster's slots: dispatch → wait → record, with bounded retries.

The loop reads `dispatch(idle slots) → ray.wait(in flight, timeout) → handle(done)`. It never spins:
each turn blocks in `ray.wait` for at most `poll_s`, and every `ray.get` is bounded. A slot runs one
spec at a time, so a GPU or NVMe device never sees two runs at once. When an actor or its node dies,
the run goes back to the queue (at most `retries` times) and is picked up by any live slot that still
matches its selector; the slot is retired and rebuilt only if its node is alive after a cool-down.
A run no live host matches becomes a failed row with the reason (or is skipped, `on_no_host: skip`).
Each finished run is handed to `record` at once, so an interrupted suite keeps what it finished.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    NodeDiedError,
    ObjectLostError,
    OwnerDiedError,
    RayActorError,
    WorkerCrashedError,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.cluster.actor import BenchWorker, PhaseBoard, RunFn, RunOutcome
from orchestrator.cluster.hosts import Slot, all_slots, display_names, list_nodes
from orchestrator.cluster.progress import Progress
from orchestrator.suite.spec import RunSpec
from worker import envs

log = logging.getLogger(__name__)

# The actor or its node went away: the run may not have happened; retry elsewhere.
LOST = (ActorDiedError, ActorUnavailableError, NodeDiedError, RayActorError, WorkerCrashedError, ObjectLostError,
        OwnerDiedError)
GET_TIMEOUT_S = 30.0
SLOT_COOLDOWN_S = 5.0
REFRESH_S = 2.0

Record = Callable[[RunSpec, RunOutcome], None]


@dataclass
class _SlotState:
    slot: Slot
    actor: Any = None
    busy: bool = False
    cooldown_until: float = 0.0


@dataclass
class _Flight:
    spec: RunSpec
    slot: _SlotState
    submitted: float


@dataclass
class Scheduler:
    """One suite run on the connected cluster. `run()` returns when every spec is recorded or resolved."""

    specs: list[RunSpec]
    record: Record
    retries: int = 2
    on_no_host: str = "fail"
    run_fn: RunFn | None = None
    on_update: Callable[[Progress], None] | None = None
    poll_s: float = 0.5
    progress: Progress = field(default_factory=Progress)

    def __post_init__(self) -> None:
        self._pending: deque[RunSpec] = deque(self.specs)
        self._attempts: dict[str, int] = {}
        self._inflight: dict[Any, _Flight] = {}
        self._slots: dict[str, _SlotState] = {}
        self._board = None
        self._board_ref = None
        self._refreshed = 0.0
        self._worker_cls = ray.remote(BenchWorker)

    # ---- the loop ---------------------------------------------------------------------------

    def run(self) -> Progress:
        self._board = ray.remote(PhaseBoard).options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=True)).remote()
        self.progress.queued = len(self._pending)
        try:
            self._refresh_slots()
            while self._pending or self._inflight:
                self._refresh_slots_every(REFRESH_S)
                self._dispatch()
                self._resolve_unplaceable()
                if not self._inflight:
                    time.sleep(self.poll_s)  # only slots cooling down after a loss: wait, bounded
                    continue
                ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=self.poll_s)
                for ref in ready:
                    self._handle(ref)
                self._expire()
                self._poll_phases()
                self._update()
        except BaseException:  # Ctrl-C or a failed results write: cancel the rest, keep what is recorded
            self.progress.cancelled = len(self._pending) + len(self._inflight)
            raise
        finally:
            self._stop_all()
        self._update()
        return self.progress

    def _dispatch(self) -> None:
        for state in sorted(self._slots.values(), key=lambda s: self.progress.load(s.slot.node.node_id)):
            if state.busy or time.monotonic() < state.cooldown_until:
                continue
            spec = next((s for s in self._pending if state.slot.matches(s.selector)), None)
            if spec is None:
                continue
            self._pending.remove(spec)
            if state.actor is None:
                state.actor = self._new_actor(state.slot)
            ref = state.actor.run.remote(spec)
            state.busy = True
            self._attempts[spec.run_id] = self._attempts.get(spec.run_id, 0) + 1
            self._inflight[ref] = _Flight(spec, state, time.monotonic())
            self.progress.start(spec.run_id, self._host(state.slot), state.slot.key)
            log.debug("dispatched %s to %s", spec.run_id, state.slot.key)

    def _handle(self, ref: Any) -> None:
        flight = self._inflight.pop(ref)
        flight.slot.busy = False
        try:
            outcome: RunOutcome = ray.get(ref, timeout=GET_TIMEOUT_S)
        except (*LOST, GetTimeoutError) as e:  # (ready but not fetchable in time: as good as lost)
            self._lost(flight, e)
            return
        outcome.attempts = self._attempts[flight.spec.run_id]
        log.debug("finished %s on %s: %s", flight.spec.run_id, flight.slot.slot.key, outcome.status)
        if outcome.status != "ok":  # a failed engine may leave its process dirty (GPU memory): start afresh
            self._recycle(flight.slot)
        self._finish(flight.spec, outcome)

    def _lost(self, flight: _Flight, err: BaseException) -> None:
        spec, state = flight.spec, flight.slot
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
        log.warning("run %s lost on %s: %s", spec.run_id, state.slot.key, reason)
        self._retire(state)
        self._refresh_slots()
        tries = self._attempts[spec.run_id]
        if tries <= self.retries:
            self.progress.retry(spec.run_id)
            self._pending.appendleft(spec)
            return
        self._finish(spec, self._failed(spec, f"gave up after {tries} attempts; last: {reason}",
                                        node_id=state.slot.node.node_id))

    def _expire(self) -> None:
        now = time.monotonic()
        for ref, flight in list(self._inflight.items()):
            if now - flight.submitted > flight.spec.timeout_s:
                del self._inflight[ref]
                self._recycle(flight.slot)  # kills the stuck engine; its host is fine
                self._finish(flight.spec, self._failed(
                    flight.spec, f"timed out after {flight.spec.timeout_s:g} s (suite timeout_s)",
                    node_id=flight.slot.slot.node.node_id))

    def _resolve_unplaceable(self) -> None:
        """Runs that no live slot can ever take (selector matches nothing alive) end here."""
        for spec in list(self._pending):
            if any(s.slot.matches(spec.selector) for s in self._slots.values()):
                continue
            self._pending.remove(spec)
            reason = f"no live host matches selector ({spec.selector.describe()})"
            if self._attempts.get(spec.run_id):
                reason += f" after {self._attempts[spec.run_id]} attempt(s) lost their host"
            if self.on_no_host == "skip" and not self._attempts.get(spec.run_id):
                log.info("skipping run %s: %s", spec.run_id, reason)
                self.progress.skip(spec.run_id)
                continue
            self._finish(spec, self._failed(spec, reason))

    def _finish(self, spec: RunSpec, outcome: RunOutcome) -> None:
        self.record(spec, outcome)  # a failed write raises: the suite stops, finished rows stay
        self.progress.finish(spec.run_id, outcome.status)

    def _failed(self, spec: RunSpec, reason: str, node_id: str | None = None) -> RunOutcome:
        return RunOutcome("failed", reason, None, None, node_id, None, time.time(),
                          attempts=self._attempts.get(spec.run_id, 0))

    # ---- slots and actors ---------------------------------------------------------------------

    def _refresh_slots_every(self, interval_s: float) -> None:
        """Follow nodes leaving and joining while runs wait (only when something is waiting)."""
        if self._pending and time.monotonic() - self._refreshed > interval_s:
            self._refresh_slots()

    def _refresh_slots(self) -> None:
        self._refreshed = time.monotonic()
        nodes = list_nodes()
        alive = {n.node_id for n in nodes}
        self.progress.names.update(display_names(nodes))
        for key, state in list(self._slots.items()):
            if state.slot.node.node_id not in alive and not state.busy:
                self._retire(state)
                del self._slots[key]
        for slot in all_slots(nodes):
            self._slots.setdefault(slot.key, _SlotState(slot))

    def _new_actor(self, slot: Slot) -> Any:
        resources = {f"nvme:{slot.nvme}": 1} if slot.nvme_is_resource else {}
        return self._worker_cls.options(
            num_cpus=1, num_gpus=1 if slot.gpu else 0, resources=resources, max_restarts=0, max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node.node_id, soft=False),
            runtime_env={"env_vars": envs.engine_process_env()},
        ).remote(slot.nvme, slot.node.node_id, self._board, self.run_fn)

    def _retire(self, state: _SlotState) -> None:
        """The actor or its node died: drop the actor and rest the slot until its node proves alive."""
        self._recycle(state)
        state.cooldown_until = time.monotonic() + SLOT_COOLDOWN_S

    def _recycle(self, state: _SlotState) -> None:
        """Kill the slot's actor; the next run on the slot gets a fresh process."""
        if state.actor is not None:
            _kill(state.actor)
        state.actor, state.busy = None, False

    def _stop_all(self) -> None:
        for ref in self._inflight:
            try:
                ray.cancel(ref)
            except Exception:  # already finished or its actor is gone
                pass
        for state in self._slots.values():
            if state.actor is not None:
                _kill(state.actor)
                state.actor = None
        if self._board is not None:
            _kill(self._board)

    # ---- progress -----------------------------------------------------------------------------

    def _poll_phases(self) -> None:
        """Non-blocking: take the last snapshot if it arrived, ask for the next."""
        if self._board_ref is not None:
            ready, _ = ray.wait([self._board_ref], timeout=0)
            if not ready:
                return
            try:
                self.progress.phases.update(ray.get(self._board_ref, timeout=GET_TIMEOUT_S))
            except Exception as e:  # progress is cosmetic; never fail a suite over it
                log.debug("phase board: %s", e)
        self._board_ref = self._board.snapshot.remote()

    def _host(self, slot: Slot) -> str:
        return self.progress.names.get(slot.node.node_id, slot.node.hostname)

    def _update(self) -> None:
        if self.on_update is not None:
            self.on_update(self.progress)


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead
        pass
