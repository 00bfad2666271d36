"""Floors that hold: the SSD figure of a run that streams from the SSD is measured next to it, with the
SSD tier's own reader (worker.host.adjacent), and a run that beats its floor is marked `floor_suspect`
in its JSON, its row and the report, instead of being reported as faster than the hardware."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from orchestrator.cluster.actor import RunOutcome
from orchestrator.report.build import build_report
from orchestrator.results.schema import build_row
from orchestrator.results.store import write_row
from orchestrator.suite.load import parse_suite
from worker.host import adjacent
from worker.host.probe import cached_probe
from worker.host.roofline import SUSPECT_ATTAINMENT, pass_bytes, roofline, suspect_warning
from worker.pack.cache import ensure_pack
from worker.run import resolve_config, run
from worker.stream.plan import place
from worker.units import GB

CPU = torch.device("cpu")
SUITE = parse_suite("name: floors\nmodels: [{name: tiny, preset: tiny}]\nmatrix: {mode: [ssd, cpu]}\n")
FP = {"hostname": "box-1", "gpu_name": None, "gpu_count": 0, "gpu_mem_gb": None, "gpu_pcie": None,
      "cuda_version": None, "torch_version": "2.13.0", "cpu_model": "cpu", "ram_gb": 64.0,
      "nvme_device": "nvme0n1", "nvme_model": "disk", "nvme_pcie": None}


@pytest.fixture()
def flat(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMBENCH_CACHE", str(tmp_path / "cache"))  # the probe is measured, cached here
    for var in ("OMP_NUM_THREADS", "MALLOC_ARENA_MAX"):  # a run sets them: restore afterwards
        monkeypatch.setenv(var, "2")
    return {"checkpoints": str(tiny_ckpt), "prompt_len": 8, "batch_size": 1, "max_new_tokens": 6, "max_seq_len": 64,
            "temperature": 0.0, "warmup_rounds": 1, "pack_dir": str(tmp_path / "pack"), "out_json": None}


@pytest.fixture()
def windows(monkeypatch):
    """Every adjacent window a run measures (the real measurement, recorded)."""
    seen, real = [], adjacent.measure

    def spy(*args, **kw):
        seen.append(real(*args, **kw))
        return seen[-1]

    monkeypatch.setattr(adjacent, "measure", spy)
    return seen


def _row(result: dict, mode: str) -> dict:
    spec = next(s for s in SUITE.specs if s.flat["mode"] == mode)
    t = time.time()
    return build_row(spec, "floors-1", RunOutcome("ok", None, result, FP, "node-1", t - 1, t, "a" * 40, False))


def test_an_ssd_run_floors_on_the_disk_read_next_to_it(flat, windows):
    r = run(resolve_config({**flat, "mode": "ssd"}))
    roof, near = r["roofline"], r["roofline"]["ssd_adjacent"]
    pack = ensure_pack(flat["checkpoints"], pack_dir=flat["pack_dir"])
    streamed = sum(n for _, n in adjacent.ssd_extents(pack.manifest, place("ssd", 2, resolve_config(flat).stream)))
    assert len(windows) == 2 and near["before"] == windows[0] and near["after"] == windows[1]
    for w in windows:  # a tiny blob: read once, whole, O_DIRECT, well inside the 2 s window
        assert w["gbps"] > 0 and w["bytes"] == streamed and w["direct"] and w["wall_s"] < 2.0
    assert near["threads"] == 8 and near["chunk_bytes"] == 64 << 20 and near["window_s"] == 2.0
    best = max(near["before_gbps"], near["after_gbps"])
    assert roof["floor_ssd_gbps"] == near["floor_gbps"] == best and roof["floor_ssd_source"] == "adjacent"
    assert near["spread"] == pytest.approx(abs(near["before_gbps"] - near["after_gbps"]) / (best + min(
        near["before_gbps"], near["after_gbps"])) * 2)
    assert roof["ssd_gbps"] == cached_probe()["ssd_gbps"] > 0  # the probe's figure, kept apart
    # the floor's SSD term is the streamed bytes at the adjacent rate (a CPU host: SSD-bound decode)
    assert roof["bound_decode"] == "ssd"
    assert roof["floor_decode_s"] == pytest.approx(roof["pass_bytes"]["ssd"] / (best * GB))
    atts = [a for a in (roof["attainment_decode"], roof["attainment_prefill"]) if a is not None]
    assert roof["floor_suspect"] is (max(atts) > SUSPECT_ATTAINMENT)
    row = _row(r, "ssd")
    assert row["ssd_before_gbps"] == near["before_gbps"] > 0 and row["ssd_after_gbps"] == near["after_gbps"] > 0
    assert row["floor_ssd_gbps"] == best and row["floor_ssd_spread"] == near["spread"]
    assert row["probe_ssd_gbps"] == roof["ssd_gbps"] and row["floor_suspect"] is roof["floor_suspect"]


@pytest.fixture()
def pinned_probe(monkeypatch):
    """The host probe's figures fixed, for tests whose subject is not the probe: a run can never beat
    its memory figure, and the disk's is far below any real one, so an SSD term in the floor of a run
    that reads no SSD would show. (The live quick probe times a 64 MiB memcpy: beside a busy test on 2
    cores it once read so low that a CPU run, normally at 0.3-0.45 of its floor, beat it: "suspect".)"""
    from worker.host import probe

    figures = {"schema": probe.PROBE_SCHEMA, "measured_at": "pinned", "ssd_gbps": 0.001, "h2d_gbps": 1000.0,
               "hbm_gbps": None, "matmul_tflops": None}
    monkeypatch.setattr(probe, "probe_host", lambda path=None, refresh=False, quick=False: figures)
    return figures


@pytest.mark.parametrize("mode", ["gpu", "cpu"])
def test_a_run_that_reads_no_ssd_measures_no_window(flat, windows, pinned_probe, mode):
    r = run(resolve_config({**flat, "mode": mode}))
    roof = r["roofline"]
    assert windows == [] and "ssd_adjacent" not in roof  # nothing read
    assert roof["pass_bytes"]["ssd"] == 0 and roof["floor_ssd_gbps"] is None and roof["floor_ssd_source"] is None
    assert roof["floor_suspect"] is False and not any("floor_suspect" in w for w in r["warnings"])
    row = _row(r, "cpu")
    assert row["floor_suspect"] is False
    assert row["ssd_before_gbps"] is row["ssd_after_gbps"] is row["floor_ssd_gbps"] is row["floor_ssd_spread"] is None


def test_no_roofline_or_no_window_reads_nothing(flat, windows):
    r = run(resolve_config({**flat, "mode": "ssd", "roofline": False}))
    assert windows == [] and r["roofline"] is None and _row(r, "ssd")["floor_suspect"] is None
    r = run(resolve_config({**flat, "mode": "ssd", "floor_window_s": 0}))
    assert windows == [] and r["roofline"]["floor_ssd_source"] == "probe"
    assert r["roofline"]["floor_ssd_gbps"] == r["roofline"]["ssd_gbps"]


def test_the_window_is_bounded_by_its_seconds(tiny_ckpt, tmp_path):
    pack = ensure_pack(str(tiny_ckpt), pack_dir=str(tmp_path / "pack"))
    stream = resolve_config({"checkpoints": str(tiny_ckpt)}).stream
    extents = adjacent.ssd_extents(pack.manifest, place("ssd", 2, stream))
    none = adjacent.measure(str(pack.blob_path), extents, 2, 1 << 20, 0.0, CPU)
    assert none["bytes"] == 0 and none["gbps"] is None
    assert adjacent.floor_ssd(none, None) is None and adjacent.spread(None, 1.0) is None
    small = adjacent.measure(str(pack.blob_path), extents, 2, 1 << 20, 30.0, CPU)  # 1 MiB requests, 2 threads
    assert small["bytes"] == sum(n for _, n in extents) and small["gbps"] > 0


def test_attainment_above_1_05_marks_the_floor_suspect(tiny_ckpt, tmp_path):
    """Honestly constructed: the same measured times against floors built on a disk figure that is right,
    then one far lower than what the run must have read at."""
    pack = ensure_pack(str(tiny_ckpt), pack_dir=str(tmp_path / "pack"))
    placement = place("ssd", 2, resolve_config({"checkpoints": str(tiny_ckpt)}).stream)
    ssd_bytes = pass_bytes(pack.manifest, placement)["ssd"]
    probe = {"ssd_gbps": 2.0, "h2d_gbps": 20.0}
    decode_ms = 4 * ssd_bytes / (2.0 * GB) * 1e3  # 4 steps, each exactly one pass at the probe's 2 GB/s
    honest = roofline(pack.manifest, placement, probe, 1, 8, 1e3, decode_ms, 4)
    assert honest["attainment_decode"] == pytest.approx(1.0) and honest["floor_suspect"] is False
    assert honest["floor_ssd_source"] == "probe" and honest["floor_ssd_gbps"] == 2.0
    low = roofline(pack.manifest, placement, probe, 1, 8, 1e3, decode_ms, 4, ssd_gbps=1.6)  # adjacent: 1.6 GB/s
    assert low["attainment_decode"] == pytest.approx(2.0 / 1.6) and low["floor_suspect"] is True
    assert low["ssd_gbps"] == 2.0 and low["floor_ssd_gbps"] == 1.6 and low["floor_ssd_source"] == "adjacent"
    just = roofline(pack.manifest, placement, probe, 1, 8, 1e3, decode_ms, 4, ssd_gbps=2.0 / 1.04)
    assert just["floor_suspect"] is False  # 1.04: within the margin
    warning = suspect_warning(low)
    assert warning.startswith("floor_suspect: attainment decode 1.25 is above 1.05")
    assert "the floor's SSD figure was 1.6 GB/s (adjacent; the probe's 2)" in warning


def test_a_disk_measured_low_next_to_the_run_marks_json_row_and_report(flat, monkeypatch, tmp_path, pinned_probe):
    """The documented hook: `adjacent.measure` replaced by one that reports the disk 1000× slower than it read
    (the probe pinned, so the CPU run's control row is not suspect by a live probe's noise)."""
    real = adjacent.measure

    def slow_disk(*args, **kw):
        w = real(*args, **kw)
        return {**w, "gbps": w["gbps"] / 1000, "busy_s": w["busy_s"] * 1000}

    monkeypatch.setattr(adjacent, "measure", slow_disk)
    r = run(resolve_config({**flat, "mode": "ssd"}))
    roof = r["roofline"]
    assert roof["attainment_decode"] > SUSPECT_ATTAINMENT and roof["floor_suspect"] is True
    assert [w for w in r["warnings"] if w.startswith("floor_suspect: attainment ")]
    row = _row(r, "ssd")
    assert row["floor_suspect"] is True and any(w.startswith("floor_suspect") for w in row["warnings"])
    uri = str(tmp_path / "results")
    write_row(uri, row, "floors", "2026-12-01")
    write_row(uri, _row(run(resolve_config({**flat, "mode": "cpu"})), "cpu"), "floors", "2026-12-01")
    page = Path(build_report(uri, tmp_path / "r.html").path).read_text()
    assert "<h2>Suspect floors (1)</h2>" in page
    marked = page[page.index("<h2>Suspect floors (1)</h2>"):].split("</section>")[0]
    assert marked.count('<tr class="suspect">') == 1 and row["run_id"] in marked and "⚠ suspect" in marked
    assert f"{row['floor_ssd_gbps']:.2f}" in marked


def test_a_report_without_suspect_runs_says_so(tmp_path):
    from tests import fakerows

    uri = str(tmp_path / "results")
    fakerows.write(uri, fakerows.history(fakerows.suite(), ["h200"], 1))
    page = Path(build_report(uri, tmp_path / "r.html").path).read_text()
    assert "<h2>Suspect floors</h2>" in page and "None: no run&#x27;s attainment is above 1.05." in page
    assert '<tr class="suspect">' not in page
