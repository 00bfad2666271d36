"""Hosts without Ray: selector matching, slot pairing, the host fingerprint and the hardware key."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.cluster.hosts import (
    Slot,
    all_slots,
    check_selectable,
    display_names,
    idle_gpu_notes,
    idle_gpus,
    slots_of,
    unused_devices,
)
from orchestrator.suite.selector import NodeFacts, Selector
from worker.errors import UserError
from worker.host import hostinfo


def node(node_id="n1", hostname="gpu-1", gpus=0, nvme=(), labels=None, accel=None, **extra) -> NodeFacts:
    res = {"CPU": 8.0, **({"GPU": float(gpus)} if gpus else {}), **{f"nvme:{d}": 1.0 for d in nvme}, **extra}
    if accel:
        res[f"accelerator_type:{accel}"] = 1.0
    return NodeFacts(node_id, hostname, "10.0.0.1", res, dict(labels or {}))


H100 = node("h" * 56, "gpu-1", gpus=2, nvme=("nvme0n1p4", "nvme1n1"), accel="H100", labels={"rack": "r7"})
CPU = node("c" * 56, "cpu-1", nvme=("sda",))
LABEL_ONLY = node("l" * 56, "box", labels={"nvme": "nvme2n1, nvme3n1", "host": "alias"})


@pytest.mark.parametrize("sel, h100, cpu, label_only", [
    (Selector(), True, True, True),
    (Selector(gpu="H100"), True, False, False),
    (Selector(gpu="h-100"), True, False, False),  # normalised: case and punctuation do not matter
    (Selector(gpu="H200"), False, False, False),
    (Selector(gpu="any"), True, False, False),
    (Selector(gpu="none"), False, True, True),
    (Selector(hosts=("cpu-1",)), False, True, False),
    (Selector(hosts=("alias",)), False, False, True),  # a node's `host` label names it too
    (Selector(hosts=("h" * 56,)), True, False, False),  # the node id
    (Selector(labels={"rack": "r7"}), True, False, False),
    (Selector(resources=("nvme:sda",)), False, True, False),
    (Selector(resources=("pool:x",)), False, False, False),
])
def test_selector_matches_nodes(sel, h100, cpu, label_only):
    assert (sel.matches_node(H100), sel.matches_node(CPU), sel.matches_node(LABEL_ONLY)) == (h100, cpu, label_only)


def test_nvme_devices_come_from_resources_and_labels():
    assert H100.nvme_devices == ["nvme0n1p4", "nvme1n1"]
    assert LABEL_ONLY.nvme_devices == ["nvme2n1", "nvme3n1"]
    assert Selector(nvme=("nvme1n1",)).matches_device("nvme1n1") and not Selector(nvme=("x",)).matches_device(None)


def test_slots_pair_gpus_with_nvme_devices():
    s = slots_of(H100)
    assert [(x.gpu, x.nvme, x.nvme_is_resource) for x in s] == [(True, "nvme0n1p4", True), (True, "nvme1n1", True)]
    four_gpus_one_disk = node(gpus=4, nvme=("nvme0n1",))
    assert [(x.gpu, x.nvme) for x in slots_of(four_gpus_one_disk)] == [(True, "nvme0n1")]  # never share an SSD
    assert [(x.gpu, x.nvme) for x in slots_of(node(gpus=2))] == [(True, None), (True, None)]
    assert [(x.gpu, x.nvme) for x in slots_of(node())] == [(False, None)]  # a CPU-only host is a host
    assert [(x.gpu, x.nvme, x.nvme_is_resource) for x in slots_of(LABEL_ONLY)] == [
        (False, "nvme2n1", False), (False, "nvme3n1", False)]
    assert len({x.key for x in slots_of(H100) + slots_of(CPU)}) == 3


def test_a_multi_gpu_host_without_devices_has_one_slot_per_gpu():
    """The embedded local Ray of a two-GPU box advertises no device: two slots, two keys (the scheduler
    keys slots by them; one shared key made one slot, so runs went one at a time)."""
    two = slots_of(node(gpus=2))
    assert [(s.gpu, s.nvme, s.index) for s in two] == [(True, None, 0), (True, None, 1)]
    assert len({s.key for s in two}) == 2 and two[0].key.endswith("/gpu0")
    assert len({s.key for s in all_slots([node("a" * 9, gpus=8), node("b" * 9, gpus=8)])}) == 16
    assert [s.key for s in slots_of(H100)] == ["hhhhhhhh/nvme0n1p4", "hhhhhhhh/nvme1n1"]  # keys with a device unchanged


def test_gpus_and_devices_that_do_not_pair_are_named():
    two_gpus_one_disk = node(gpus=2, nvme=("nvme0n1",))
    assert len(slots_of(two_gpus_one_disk)) == 1 and idle_gpus(two_gpus_one_disk) == 1
    assert unused_devices(two_gpus_one_disk) == []
    one_gpu_two_disks = node(gpus=1, nvme=("nvme1n1", "nvme0n1"))
    assert [s.nvme for s in slots_of(one_gpu_two_disks)] == ["nvme0n1"] and unused_devices(one_gpu_two_disks) == ["nvme1n1"]
    assert idle_gpus(node(gpus=2)) == 0 and idle_gpus(H100) == 0 and unused_devices(CPU) == []
    (note,) = idle_gpu_notes([two_gpus_one_disk, H100, node("x", "y", gpus=2)])
    assert "2 GPUs but 1 NVMe device(s) advertised (nvme0n1): 1 slot(s), 1 GPU(s) idle" in note


def test_a_run_selecting_a_device_its_host_cannot_use_is_refused_in_one_line():
    one_gpu_two_disks = node("u" * 9, "gpu-u", gpus=1, nvme=("nvme0n1", "nvme1n1"))
    with pytest.raises(UserError) as e:
        check_selectable({"r1": Selector(nvme=("nvme1n1",))}, [one_gpu_two_disks, CPU])
    msg = str(e.value)
    assert "run r1 selects NVMe device nvme1n1, which host gpu-u advertises but cannot use" in msg
    assert "1 GPU(s) for 2 devices (nvme0n1, nvme1n1)" in msg and "select nvme0n1" in msg and "\n" not in msg
    check_selectable({"r1": Selector(nvme=("nvme0n1", "nvme1n1"))}, [one_gpu_two_disks])  # nvme0n1 has a slot
    check_selectable({"r1": Selector(nvme=("gone",)), "r2": Selector()}, [one_gpu_two_disks])  # absent: not refused
    other = node("v" * 9, "gpu-v", gpus=2, nvme=("nvme0n1", "nvme1n1"))
    check_selectable({"r1": Selector(nvme=("nvme1n1",))}, [one_gpu_two_disks, other])  # another host can take it
    with pytest.raises(UserError):  # a selector that rules the usable host out still names the stranded one
        check_selectable({"r1": Selector(nvme=("nvme1n1",), hosts=("gpu-u",))}, [one_gpu_two_disks, other])


def test_slot_match_needs_node_and_device():
    a, b = slots_of(H100)
    sel = Selector(gpu="H100", nvme=("nvme1n1",))
    assert not a.matches(sel) and b.matches(sel)
    dead = Slot(NodeFacts(**{**H100.__dict__, "alive": False}), True, "nvme1n1")
    assert not dead.matches(sel)


def test_display_names_disambiguate_repeated_hostnames():
    names = display_names([node("aaaaaaaa1", "vm"), node("bbbbbbbb2", "vm"), node("c3", "solo")])
    assert names == {"aaaaaaaa1": "vm/aaaaaa", "bbbbbbbb2": "vm/bbbbbb", "c3": "solo"}


# ---- hostinfo ------------------------------------------------------------------------------------


def test_fingerprint_of_this_host_is_plain_data():
    fp = hostinfo.host_fingerprint(None)
    assert fp["hostname"] and fp["torch_version"] and fp["nvme_device"] is None and fp["nvme_model"] is None
    assert fp["ram_gb"] > 0 and isinstance(fp["gpu_count"], int)
    assert fp["gpu_name"] is None or fp["gpu_count"] >= 1
    assert hostinfo.host_fingerprint("/dev/no-such-disk")["nvme_model"] is None  # unknown: None, not invented


def test_fingerprint_names_the_run_s_own_gpu_and_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fp = hostinfo.host_fingerprint(None)
    if fp["gpu_name"] is None:  # a CPU host: null, not invented
        assert (fp["gpu_index"], fp["gpu_uuid"], fp["cuda_visible_devices"]) == (None, None, None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hostinfo.host_fingerprint(None)["cuda_visible_devices"] is None  # empty: no GPU, as unset
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # as Ray sets it for an actor holding GPU 1
    assert hostinfo.host_fingerprint(None)["cuda_visible_devices"] == "1"


def test_gpu_fields_come_from_the_run_s_device(monkeypatch):
    """The CUDA path on a CPU machine: torch.cuda answered by a fake with two cards."""
    import torch

    cards = [SimpleNamespace(name="NVIDIA H200", total_memory=140 * 2**30, uuid="58af5a8f-1c2e-4d6a-9c0b-0123456789ab"),
             SimpleNamespace(name="NVIDIA H200", total_memory=140 * 2**30, uuid="GPU-77aa5a8f-1c2e-4d6a-9c0b-0123456789ab")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: cards[i])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    fp = hostinfo.host_fingerprint(None)  # default: the current device
    assert (fp["gpu_index"], fp["gpu_uuid"], fp["gpu_name"], fp["gpu_count"], fp["cuda_visible_devices"]) == (
        1, "GPU-77aa5a8f-1c2e-4d6a-9c0b-0123456789ab", "NVIDIA H200", 2, "2,3")
    fp0 = hostinfo.host_fingerprint(None, 0)
    assert (fp0["gpu_index"], fp0["gpu_uuid"]) == (0, "GPU-58af5a8f-1c2e-4d6a-9c0b-0123456789ab")
    assert hostinfo.gpu_uuid(SimpleNamespace()) is None and hostinfo.gpu_uuid(SimpleNamespace(uuid="")) is None


def test_nvme_model_from_sysfs_for_a_disk_and_its_partition(tmp_path, monkeypatch):
    disk = tmp_path / "devices" / "nvme0n1"
    (disk / "device").mkdir(parents=True)
    (disk / "device" / "model").write_text("SAMSUNG MZQL23T8HCLS-00A07   \n")
    (disk / "nvme0n1p4").mkdir()
    (disk / "nvme0n1p4" / "partition").write_text("4\n")
    block = tmp_path / "class_block"
    block.mkdir()
    (block / "nvme0n1").symlink_to(disk)
    (block / "nvme0n1p4").symlink_to(disk / "nvme0n1p4")
    monkeypatch.setattr(hostinfo, "SYS_BLOCK", block)
    assert hostinfo.nvme_model("nvme0n1") == "SAMSUNG MZQL23T8HCLS-00A07"
    assert hostinfo.nvme_model("nvme0n1p4") == "SAMSUNG MZQL23T8HCLS-00A07"
    assert hostinfo.host_fingerprint("/dev/nvme0n1p4")["nvme_device"] == "nvme0n1p4"
    assert hostinfo.nvme_model("sdz") is None


FP = {"hostname": "a", "gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 1, "gpu_mem_gb": 79.1, "gpu_pcie": "32.0 GT/s x16",
      "cpu_model": "AMD EPYC 9654", "ram_gb": 503.2, "nvme_model": "SAMSUNG MZQL23T8HCLS", "torch_version": "2.13"}


def test_hardware_key_is_stable_and_covers_only_hardware():
    key = hostinfo.hardware_key(FP)
    assert re.fullmatch(r"h100-80gb-hbm3x1-[0-9a-f]{10}", key)
    same = {**FP, "hostname": "b", "torch_version": "2.14", "ram_gb": 502.7, "gpu_mem_gb": 79.14}
    assert hostinfo.hardware_key(same) == key  # other host, other software, same machine type
    for field, value in [("gpu_name", "NVIDIA H200"), ("gpu_count", 2), ("nvme_model", "other"), ("ram_gb", 1007.0),
                         ("cpu_model", "Intel Xeon"), ("gpu_mem_gb", 94.0), ("gpu_pcie", "16.0 GT/s x16")]:
        assert hostinfo.hardware_key({**FP, field: value}) != key, field
    assert hostinfo.hardware_key({"cpu_model": "x", "ram_gb": 16.0}).startswith("cpu-")


def test_git_commit_of_the_source_tree():
    root = hostinfo.source_root()
    expected = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if expected.returncode != 0:
        assert hostinfo.git_commit() is None
    else:
        assert hostinfo.git_commit() == expected.stdout.strip()
        assert isinstance(hostinfo.git_dirty(), bool)
    assert (Path(root) / "worker" / "host" / "hostinfo.py").is_file()


def test_no_git_checkout_means_none(tmp_path, monkeypatch):
    monkeypatch.setattr(hostinfo, "source_root", lambda: tmp_path)
    hostinfo.git_commit.cache_clear()
    hostinfo.git_dirty.cache_clear()
    try:
        assert hostinfo.git_commit() is None and hostinfo.git_dirty() is None
    finally:
        hostinfo.git_commit.cache_clear()
        hostinfo.git_dirty.cache_clear()
