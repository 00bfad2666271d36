"""What a suite expands into: the model a run uses (`ModelSpec`) and the run itself (`RunSpec`).

`ModelSpec` is both the suite's `models:` entry (validated by pydantic where the YAML enters) and what
travels to a worker, so the two can never drift apart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from orchestrator.suite.selector import Selector
from worker.config import RunConfig
from worker.synth.presets import PRESETS


@dataclass(frozen=True)
class ModelSpec:
    """A model of the suite: `path` (an HF checkpoint dir on the worker hosts) or a synthetic `preset`
    (made once per host into the cache); the worker turns it into a checkpoint directory."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")]
    path: str | None = None
    preset: str | None = None
    layers: Annotated[int | None, Field(ge=1)] = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    seed: int = 0
    overrides: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.preset is None):
            raise ValueError(f"give exactly one of `path` (checkpoint dir) or `preset` ({', '.join(PRESETS)})")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {', '.join(PRESETS)}")
        if self.path is not None and (self.layers is not None or self.overrides is not None):
            raise ValueError("`layers` and `overrides` apply to presets only")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """What determines the weights (the name is a label, not part of the identity)."""
        d = self.to_dict()
        d.pop("name")
        return d


@dataclass(frozen=True)
class RunSpec:
    """One run of the plan: everything a worker needs, and the keys that identify it.

    spec_hash: the resolved config + model + host selector (unique within a suite; run_id derives from
    it, so resubmitting the same suite finds the same run ids). config_key: config + model only, so
    rows of the same work on different hardware, suites or nights can be compared.
    """

    suite: str
    run_id: str
    spec_hash: str
    config_key: str
    repeat: int
    model: ModelSpec
    selector: Selector
    flat: dict[str, Any]
    timeout_s: float
    reuse: Literal["none", "weights"] = "none"  # the suite's `reuse:` (worker.host.reuse); not in the keys

    def config(self, checkpoints: str) -> RunConfig:
        return RunConfig.from_flat({**self.flat, "checkpoints": checkpoints, "out_json": None},
                                   where=f"suite {self.suite}: run {self.run_id}")


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
