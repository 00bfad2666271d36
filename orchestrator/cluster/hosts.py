"""Hosts and slots: what the cluster offers, as the orchestrator schedules it.

A host is a Ray node. Its NVMe devices are custom resources `nvme:<dev>` (or a label
`nvme=<dev>[,<dev>]`), its GPUs Ray's `GPU` resource. A slot is one (host, GPU, NVMe device) triple:
the unit one actor holds, so no two runs share a GPU or an SSD. GPUs and devices pair up one to one,
devices in name order (a host with 8 GPUs and 2 NVMe devices has 2 slots and 6 idle GPUs; 2 GPUs and
1 device: 1 slot); a host with GPUs and no advertised device has a slot per GPU (the embedded local
Ray of a multi-GPU box); a CPU-only host has a slot per device, or one. Which physical GPU a slot's
actor gets is Ray's choice (it sets the actor's CUDA_VISIBLE_DEVICES); the slot only counts GPUs.
A GPU host advertising more devices than GPUs cannot use the extra ones: a run whose selector names
only such devices is refused before anything runs (`check_selectable`) rather than failing as "no
live host" while `bench hosts` lists the device. A device named only by a label is no Ray resource,
so Ray cannot reserve it: its exclusivity holds within one submission only (advertise devices as
resources on clusters that several people submit to).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from orchestrator.suite.selector import NVME_PREFIX, NodeFacts, Selector
from worker.errors import UserError

log = logging.getLogger(__name__)

HOST_INFO_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Slot:
    node: NodeFacts
    gpu: bool
    nvme: str | None
    index: int = 0  # the slot's ordinal on its node: two GPU slots without a device differ only here

    @property
    def key(self) -> str:
        """Unique per slot of the cluster (the scheduler keys its slots by it)."""
        if self.nvme is not None:
            return f"{self.node.node_id[:8]}/{self.nvme}"
        return f"{self.node.node_id[:8]}/{f'gpu{self.index}' if self.gpu else 'cpu'}"

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
        return [Slot(node, True, d, i) for i, d in enumerate(devs[:node.gpus])]
    if node.gpus:
        return [Slot(node, True, None, i) for i in range(node.gpus)]
    return [Slot(node, False, d, i) for i, d in enumerate(devs)] or [Slot(node, False, None)]


def idle_gpus(node: NodeFacts) -> int:
    """GPUs no slot uses: a GPU host advertising fewer NVMe devices than GPUs (but at least one)."""
    devs = len(node.nvme_devices)
    return max(node.gpus - devs, 0) if devs else 0


def unused_devices(node: NodeFacts) -> list[str]:
    """NVMe devices no slot uses: those past the GPU count on a GPU host, in name order."""
    return node.nvme_devices[node.gpus:] if node.gpus else []


def check_selectable(selectors: dict[str, Selector], nodes: list[NodeFacts]) -> None:
    """Refuse a run whose selector names NVMe devices that live hosts advertise but cannot use.

    `selectors` maps run ids to their selectors. A run some slot matches is fine, and so is one whose
    devices are simply not there (a host that is down: the run fails or is skipped as the suite says).
    """
    slots = all_slots(nodes)
    for run_id, sel in selectors.items():
        if sel.nvme is None or any(s.matches(sel) for s in slots):
            continue
        stranded = [(n, d) for n in nodes if sel.matches_node(n) for d in unused_devices(n) if d in sel.nvme]
        if stranded:
            n, d = stranded[0]
            raise UserError(
                f"run {run_id} selects NVMe device {d}, which host {n.hostname or n.node_id[:8]} advertises but "
                f"cannot use: it has {n.gpus} GPU(s) for {len(n.nvme_devices)} devices "
                f"({', '.join(n.nvme_devices)}) and pairs one device per GPU in name order; advertise at most one "
                f"device per GPU, or select {', '.join(n.nvme_devices[:n.gpus])}")


def idle_gpu_notes(nodes: list[NodeFacts]) -> list[str]:
    """One line per host whose GPUs outnumber its advertised devices (runs there go one per device)."""
    names = display_names(nodes)
    return [f"host {names[n.node_id]}: {n.gpus} GPUs but {len(n.nvme_devices)} NVMe device(s) advertised "
            f"({', '.join(n.nvme_devices)}): {len(slots_of(n))} slot(s), {idle_gpus(n)} GPU(s) idle; advertise "
            "one device per GPU, or none for a slot per GPU sharing the disk" for n in nodes if idle_gpus(n)]


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
            "idle_gpus": idle_gpus(node),
            "unused_nvme": unused_devices(node),
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
