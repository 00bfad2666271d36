"""The host probe on a CPU host: quick figures, the per-host cache, and the O_DIRECT refusal path."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path

import pytest

from worker.errors import UserError
from worker.host import probe


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("STREAMBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def quick_doc(tmp_path_factory) -> dict:
    """One real quick probe of a scratch file in a temp directory (uncached: `measure`)."""
    return probe.measure(str(tmp_path_factory.mktemp("disk")), quick=True)


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_quick_probe_gives_positive_finite_figures(quick_doc):
    doc = quick_doc
    assert _finite(doc["ssd_gbps"]) and _finite(doc["h2d_gbps"]) and _finite(doc["d2h_gbps"])
    assert doc["hbm_gbps"] is None and doc["h2d_pageable_gbps"] is None  # no CUDA here
    assert "memcpy" in doc["details"]["h2d"]["kind"]
    ssd = doc["details"]["ssd"]
    assert ssd["scratch"] and ssd["bytes"] == probe.QUICK.scratch_bytes
    assert len(ssd["sweep"]) == len(probe.QUICK.threads) * len(probe.QUICK.request_mib)
    assert ssd["gbps"] == max(p["gbps"] for p in ssd["sweep"]) == doc["ssd_gbps"]
    assert isinstance(doc["ssd_direct"], bool)
    assert not list(Path(doc["ssd_path"]).iterdir())  # the scratch file is gone


def test_cache_written_reused_and_refreshed(cache, quick_doc, monkeypatch):
    calls = []

    def fake_measure(path, quick=False):
        calls.append((path, quick))
        return {**quick_doc, "quick": quick, "ssd_path": path or quick_doc["ssd_path"],
                "measured_at": str(len(calls))}

    monkeypatch.setattr(probe, "measure", fake_measure)
    assert probe.cached_probe() is None
    first = probe.probe_host(quick=True)
    assert json.loads(probe.cache_path().read_text()) == first == probe.cached_probe()
    assert probe.cache_path().parent == cache
    assert probe.probe_host(quick=True) == first and len(calls) == 1  # reused
    assert probe.probe_host(quick=True, refresh=True)["measured_at"] == "2"  # refreshed
    assert probe.probe_host()["quick"] is False and len(calls) == 3  # a quick figure does not answer a full probe
    assert probe.probe_host(quick=True)["measured_at"] == "3"  # a full one answers a quick one
    other = str(cache.parent)
    assert probe.probe_host(other, quick=True)["ssd_path"] == other and len(calls) == 4  # another disk


def test_unreadable_cache_is_none(cache):
    cache.mkdir()
    probe.cache_path().write_text("{not json")
    assert probe.cached_probe() is None


def test_o_direct_refused_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(probe.os, "open", no_direct)
    with caplog.at_level(logging.WARNING, logger="worker.host.probe"):
        ssd = probe.measure_ssd(str(tmp_path), probe.QUICK)
    assert ssd["direct"] is False and ssd["reliable"] is False and _finite(ssd["gbps"])
    assert any("O_DIRECT refused" in w for w in ssd["warnings"])
    assert "O_DIRECT refused" in caplog.text


def test_o_direct_read_refused_after_open_falls_back(tmp_path, monkeypatch):
    """Some filesystems accept the O_DIRECT open and refuse the read itself."""
    import fcntl

    real_preadv = os.preadv

    def picky(fd, bufs, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, bufs, offset)

    monkeypatch.setattr(probe.os, "preadv", picky)
    ssd = probe.measure_ssd(str(tmp_path), probe.QUICK)
    assert ssd["direct"] is False and ssd["reliable"] is False and _finite(ssd["gbps"])
    assert any("O_DIRECT read refused" in w for w in ssd["warnings"])


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_memory_backed_filesystem_is_flagged(tmp_path):
    d = Path("/dev/shm") / f"probe-test-{os.getpid()}"
    d.mkdir()
    try:
        ssd = probe.measure_ssd(str(d), probe.QUICK)
    finally:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    assert ssd["reliable"] is False and ssd["fs_type"] == "tmpfs"  # O_DIRECT or not, it is RAM
    assert any("memory-backed" in w or "O_DIRECT refused" in w for w in ssd["warnings"])


def test_existing_file_is_read_not_written(tmp_path):
    f = tmp_path / "blob"
    data = os.urandom(8 << 20)
    f.write_bytes(data)
    ssd = probe.measure_ssd(str(f), probe.QUICK)
    assert f.read_bytes() == data and not ssd["scratch"] and ssd["target"] == str(f.resolve())
    assert [p["request_mib"] for p in ssd["sweep"]] == [1, 4, 1, 4] and _finite(ssd["gbps"])


def test_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        probe.measure_ssd(str(tmp_path / "nope"), probe.QUICK)
    small = tmp_path / "small"
    small.write_bytes(b"x" * 4096)
    with pytest.raises(UserError, match="at least 1 MiB"):
        probe.measure_ssd(str(small), probe.QUICK)


def test_cli_probe(cache, quick_doc, monkeypatch):
    from click.testing import CliRunner

    import cli

    monkeypatch.setattr(probe, "measure", lambda path, quick=False: {**quick_doc, "quick": quick})
    res = CliRunner().invoke(cli.bench, ["probe", "--quick", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["ssd_gbps"] == quick_doc["ssd_gbps"]
    res = CliRunner().invoke(cli.bench, ["probe", "--quick"])
    assert res.exit_code == 0 and "SSD read" in res.output and "memcpy" in res.output


def test_a_directory_holding_a_pack_is_probed_by_reading_its_blob(tmp_path):
    """No scratch is written where a pack blob is already there: the blob is what the SSD tier reads."""
    cache = tmp_path / ".streambench-pack"
    cache.mkdir()
    blob = cache / "bfloat16.blob"
    data = os.urandom(probe.QUICK.scratch_bytes)
    blob.write_bytes(data)
    ssd = probe.measure_ssd(str(tmp_path), probe.QUICK)
    assert ssd["read"] == str(blob) and not ssd["scratch"] and _finite(ssd["gbps"])
    assert blob.read_bytes() == data and sorted(p.name for p in cache.iterdir()) == ["bfloat16.blob"]
    small = tmp_path / "small"
    small.mkdir()
    (small / "x.blob").write_bytes(b"0" * 4096)  # too small to measure a disk: a scratch file instead
    assert probe.measure_ssd(str(small), probe.QUICK)["scratch"]
