"""Hosts and slots: what the cluster offers, as the orchestrator schedules it.

A host is a Ray node. Its NVMe devices are custom resources `nvme:<dev>` (or a label
`nvme=<dev>[,<dev>]`), its GPUs Ray's `GPU` resource. A slot is one (host, GPU, NVMe device) triple:
the unit one actor holds, so no two runs share a GPU or an SSD. GPUs and devices pair up one to one
(a host with 8 GPUs and 2 NVMe devices has 2 slots); a host with GPUs and no advertised device has a
slot per GPU; a CPU-only host has a slot per device, or one. A device named only by a label is no Ray
resource, so Ray cannot reserve it: its exclusivity holds within one submission only (advertise devices
as resources on clusters that several people submit to).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from orchestrator.suite.selector import NVME_PREFIX, NodeFacts, Selector

log = logging.getLogger(__name__)

HOST_INFO_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Slot:
    node: NodeFacts
    gpu: bool
    nvme: str | None

    @property
    def key(self) -> str:
        return f"{self.node.node_id[:8]}/{self.nvme or ('gpu' if self.gpu else 'cpu')}"

    @property
    def nvme_is_resource(self) -> bool:
        return self.nvme is not None and f"{NVME_PREFIX}{self.nvme}" in self.node.resources

    def matches(self, selector: Selector) -> bool:
        return self.node.alive and selector.matches_node(self.node) and selector.matches_device(self.nvme)


def list_nodes() -> list[NodeFacts]:
    """Alive Ray nodes of the connected cluster."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        out.append(NodeFacts(node_id=n["NodeID"], hostname=n.get("NodeManagerHostname") or "",
                             ip=n.get("NodeManagerAddress") or "", resources=dict(n.get("Resources") or {}),
                             labels=dict(n.get("Labels") or {})))
    return out


def slots_of(node: NodeFacts) -> list[Slot]:
    devs = node.nvme_devices
    if node.gpus and devs:
        return [Slot(node, True, d) for d in devs[:node.gpus]]
    if node.gpus:
        return [Slot(node, True, None) for _ in range(node.gpus)]
    return [Slot(node, False, d) for d in devs] or [Slot(node, False, None)]


def all_slots(nodes: list[NodeFacts]) -> list[Slot]:
    return [s for n in nodes for s in slots_of(n)]


def display_names(nodes: list[NodeFacts]) -> dict[str, str]:
    """node_id → a short name: the hostname, with a node id prefix where hostnames repeat."""
    counts: dict[str, int] = {}
    for n in nodes:
        counts[n.hostname] = counts.get(n.hostname, 0) + 1
    return {n.node_id: n.hostname if counts[n.hostname] == 1 else f"{n.hostname}/{n.node_id[:6]}" for n in nodes}


def describe_hosts(timeout_s: float = HOST_INFO_TIMEOUT_S) -> list[dict[str, Any]]:
    """Every alive host with its GPUs, NVMe devices, fingerprint and cached probe figures.

    One zero-CPU task per node (pinned to it) reads the fingerprint and the probe cache there; a node
    that does not answer in time is listed with what Ray knows and `probe: None`.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = list_nodes()
    names = display_names(nodes)
    task = ray.remote(num_cpus=0, max_retries=0)(_host_report)
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote(
        n.nvme_devices): n for n in nodes}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    out = []
    for ref, node in refs.items():
        report: dict[str, Any] = {"fingerprint": None, "probe": None, "nvme_models": {}}
        if ref in ready:
            try:
                report = ray.get(ref, timeout=5)
            except Exception as e:  # a node that cannot answer is still listed
                log.warning("host %s did not report: %s", names[node.node_id], e)
        else:
            ray.cancel(ref, force=True)
        out.append({
            "host": names[node.node_id],
            "node_id": node.node_id,
            "ip": node.ip,
            "gpus": node.gpus,
            "accelerator": node.accelerator,
            "nvme": node.nvme_devices,
            "slots": len(slots_of(node)),
            "cpus": node.resources.get("CPU", 0),
            "labels": {k: v for k, v in node.labels.items() if not k.startswith("ray.io/")},
            **report,
        })
    return out


def _host_report(devices: list[str]) -> dict[str, Any]:
    """Runs on the node itself."""
    from worker.host import hostinfo
    from worker.host.probe import cached_probe

    fp = hostinfo.host_fingerprint(devices[0] if devices else None)
    return {"fingerprint": fp, "probe": cached_probe(),
            "nvme_models": {d: hostinfo.nvme_model(d) for d in devices}}
