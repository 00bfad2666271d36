"""Which hosts a run may use: a selector over Ray node facts, checked without touching Ray.

A selector is part of a suite's matrix (`host:`). Every condition given must hold; an empty selector
matches any host. Matching works on `NodeFacts` (what `ray.nodes()` says about a node), so it is unit
testable and the scheduler can re-check it on the nodes still alive after a failure.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ConfigDict

NVME_PREFIX = "nvme:"
ACCEL_PREFIX = "accelerator_type:"


@dataclass(frozen=True)
class NodeFacts:
    """One Ray node as the orchestrator sees it."""

    node_id: str
    hostname: str
    ip: str
    resources: dict[str, float]
    labels: dict[str, str]
    alive: bool = True

    @property
    def gpus(self) -> int:
        return int(self.resources.get("GPU", 0))

    @property
    def nvme_devices(self) -> list[str]:
        """NVMe devices advertised as custom resources `nvme:<dev>` or a label `nvme=<dev>[,<dev>]`."""
        devs = {k[len(NVME_PREFIX):] for k in self.resources if k.startswith(NVME_PREFIX)}
        devs.update(d.strip() for d in self.labels.get("nvme", "").split(",") if d.strip())
        return sorted(devs)

    @property
    def accelerator(self) -> str | None:
        for k in self.resources:
            if k.startswith(ACCEL_PREFIX):
                return k[len(ACCEL_PREFIX):]
        return self.labels.get("ray.io/accelerator-type")


@dataclass(frozen=True)
class Selector:
    """Conditions on the host (and NVMe device) of a run; None means "any"."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    hosts: tuple[str, ...] | None = field(default=None, metadata={
        "help": "Host names, IPs, node ids, or values of a node's `host` label."})
    gpu: str | None = field(default=None, metadata={
        "help": "GPU model substring (e.g. H100, matched against Ray's accelerator type); "
                "`any` = a GPU host, `none` = a CPU-only host."})
    nvme: tuple[str, ...] | None = field(default=None, metadata={"help": "NVMe devices the run may use."})
    resources: tuple[str, ...] | None = field(default=None, metadata={
        "help": "Custom resources the node must advertise (e.g. pool:nightly)."})
    labels: dict[str, str] | None = field(default=None, metadata={"help": "Node labels that must match."})

    def matches_node(self, node: NodeFacts) -> bool:
        if self.hosts is not None and not (set(self.hosts) & _names(node)):
            return False
        if self.gpu is not None and not _gpu_matches(self.gpu, node):
            return False
        if self.resources is not None and not all(node.resources.get(r, 0) > 0 for r in self.resources):
            return False
        if self.labels is not None and any(node.labels.get(k) != str(v) for k, v in self.labels.items()):
            return False
        return True

    def matches_device(self, nvme: str | None) -> bool:
        return self.nvme is None or nvme in self.nvme

    def to_dict(self) -> dict[str, Any]:
        """Only the conditions given (what the plan and the result rows show)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def describe(self) -> str:
        d = self.to_dict()
        return ", ".join(f"{k}={v}" for k, v in d.items()) if d else "any host"


def _names(node: NodeFacts) -> set[str]:
    names = {node.hostname, node.ip, node.node_id, node.hostname.split(".")[0]}
    if "host" in node.labels:
        names.add(node.labels["host"])
    return names


def model_matches(want: str, have: str | None) -> bool:
    """A GPU model substring, ignoring case and punctuation: `h100` matches "NVIDIA H100 80GB HBM3"."""
    def norm(s: str) -> str:
        return re.sub(r"[^a-z0-9]", "", s.lower())

    return have is not None and norm(want) in norm(have)


def _gpu_matches(want: str, node: NodeFacts) -> bool:
    if want.lower() == "none":
        return node.gpus == 0
    if node.gpus == 0:
        return False
    if want.lower() == "any":
        return True
    return model_matches(want, node.accelerator)
