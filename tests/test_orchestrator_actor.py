"""The worker side of a run as a plain class (no Ray): model materialisation, {nvme}, failures as outcomes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from orchestrator.cluster import actor
from orchestrator.cluster.actor import BenchWorker, PhaseBoard, materialise
from orchestrator.suite.load import parse_suite
from orchestrator.suite.spec import ModelSpec


class Board:
    """Stands in for the PhaseBoard actor handle: `board.set.remote(run_id, phase)`."""

    def __init__(self):
        self.real = PhaseBoard()
        self.set = type("M", (), {"remote": staticmethod(self.real.set)})()


def spec_for(ckpt: Path, matrix: str = "{mode: gpu}"):
    return parse_suite(f"name: a\nmodels: [{{name: t, path: {ckpt}}}]\nmatrix: {matrix}\n").specs[0]


def test_run_passes_the_resolved_config_and_reports_phases(tiny_ckpt):
    seen = {}

    def fake(cfg, on_phase=None):
        seen["cfg"] = cfg
        on_phase("decode")
        return {"metrics": {}}

    board = Board()
    w = BenchWorker(nvme="nvme0n1", node_id="n1", board=board, run_fn=fake)
    spec = spec_for(tiny_ckpt, "{raw_device: '/dev/{nvme}', manifest: /m.json, batch_size: 3}")
    out = w.run(spec)
    assert out.status == "ok" and out.error is None and out.node_id == "n1"
    assert out.finished_at >= out.started_at and out.fingerprint["nvme_device"] == "nvme0n1"
    cfg = seen["cfg"]
    assert (cfg.checkpoints, cfg.raw_device, cfg.batch_size, cfg.out_json) == (str(tiny_ckpt), "/dev/nvme0n1", 3, None)
    assert board.real.snapshot() == {spec.run_id: "ok"}  # start, decode, then the final status


def test_failures_are_outcomes_with_the_reason(tiny_ckpt, tmp_path):
    def boom(cfg, on_phase=None):
        raise ValueError("bad shape")

    w = BenchWorker(nvme=None, run_fn=boom)
    out = w.run(spec_for(tiny_ckpt))
    assert (out.status, out.error, out.result) == ("failed", "ValueError: bad shape", None)
    out = w.run(spec_for(tiny_ckpt, "{raw_device: '/dev/{nvme}', manifest: /m.json}"))
    assert out.status == "failed" and "raw_device use {nvme} but this host advertises no NVMe device" in out.error
    out = w.run(spec_for(tmp_path / "nothing-here"))
    assert out.status == "failed" and "no checkpoint at" in out.error


def test_preset_models_are_made_once_per_host_even_when_raced(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMBENCH_CACHE", str(tmp_path))
    calls = []
    real = __import__("worker.synth.checkpoints", fromlist=["make_model"]).make_model

    def counting(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)

    monkeypatch.setattr("worker.synth.checkpoints.make_model", counting)
    model = ModelSpec("m", preset="tiny", layers=1, dtype="float32", overrides={"vocab_size": 1000})
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(materialise(model))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and (Path(paths[0]) / "config.json").is_file()
    assert materialise(model) == paths[0] and len(calls) <= 3
    made = len(calls)
    materialise(model)
    assert len(calls) == made  # cached: not made again
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # losers of the race cleaned up
    other = materialise(ModelSpec("m", preset="tiny", layers=2, dtype="float32", overrides={"vocab_size": 1000}))
    assert other != paths[0]


def test_actor_module_does_not_import_ray():
    import ast

    tree = ast.parse(Path(actor.__file__).read_text())
    imported = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "ray" not in imported


@pytest.mark.parametrize("nvme", ["nvme0n1", None])
def test_fingerprint_taken_once_at_start(tiny_ckpt, nvme):
    w = BenchWorker(nvme=nvme, run_fn=lambda cfg, on_phase=None: {})
    assert w.info()["fingerprint"]["nvme_device"] == nvme


PLAIN = (dict, list, tuple, str, int, float, bool, type(None))


def _not_plain(x, path="outcome") -> list[str]:
    """Paths of values whose type is not exactly a plain Python one (a str subclass counts as not)."""
    if type(x) not in PLAIN:
        return [f"{path}: {type(x).__module__}.{type(x).__qualname__}"]
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in _not_plain(v, f"{path}.{k}")]
    if isinstance(x, (list, tuple)):
        return [p for i, v in enumerate(x) for p in _not_plain(v, f"{path}[{i}]")]
    return []


def test_outcomes_hold_only_plain_values_so_the_driver_never_imports_torch(tiny_ckpt):
    """The outcome crosses Ray to the driver: one torch.TorchVersion in it (torch.__version__) made the
    driver import torch on the first result, seconds of every `bench submit` (2-3 s measured here)."""
    w = BenchWorker(nvme=None)
    matrix = "{mode: [gpu, ssd], max_new_tokens: 2, prompt_len: 4, max_seq_len: 32, warmup_rounds: 0}"
    for spec in parse_suite(f"name: a\nmodels: [{{name: t, path: {tiny_ckpt}}}]\nmatrix: {matrix}\n").specs:
        out = w.run(spec)
        assert out.status == "ok", out.error
        assert _not_plain(out.result) == [] and _not_plain(out.fingerprint) == []
        system = out.result["system"]  # the run JSON's host section names the run's own GPU (none here)
        assert {"gpu_index", "gpu_uuid", "gpu_name", "cuda_visible_devices"} <= set(system)
        assert system["device"] != "cpu" or system["gpu_uuid"] is None
