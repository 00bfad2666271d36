"""Realistic result rows for tests of compare / regress / report, without running the engine.

Rows come from the real pipeline: a real suite (`parse_suite`) gives the specs and their config keys,
a synthetic engine result document goes through `orchestrator.results.schema.build_row`, and `write` stores
rows with the real `orchestrator.results.store.write_row`. Only the numbers are invented, from a small
performance model so that the metrics agree with each other: a per-token decode time by mode and
batch, scaled by the host's speed; prefill proportional to prompt tokens; I/O bandwidth below the
host's probe figures; attainment = floor / measured. Noise is lognormal: `noise` per run, `night_sd`
shared by all runs of one host in one night (nights differ more than repeats do, as on real boxes).
`slow` multiplies the run times (1.3 = 30% slower), which is how tests plant a regression.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.cluster.actor import RunOutcome
from orchestrator.results.schema import FILE_SCHEMA, SCHEMA, build_row
from orchestrator.results.store import open_uri, run_file, write_row
from orchestrator.suite.load import Suite, parse_suite
from orchestrator.suite.spec import RunSpec

SUITE_YAML = """
name: nightly
models: [{name: llama3.1-8b, preset: llama3.1-8b}]
repeats: 3
defaults: {max_new_tokens: 32, prompt_len: 512, max_seq_len: 2048, temperature: 0}
matrix:
  - {mode: [gpu, mixed], batch_size: [1, 8], host: &gpus [{gpu: H100}, {gpu: H200}, {gpu: L40S}]}
  - {mode: mixed, batch_size: 1, topk_blk: 8, host: *gpus}
"""
START = datetime(2026, 11, 1, 1, 0, tzinfo=timezone.utc)
COMMITS = [f"{i:x}" * 40 for i in range(1, 16)]


def _fp(hostname: str, gpu: str | None, mem: float | None, nvme: str, cpu: str, ram: float) -> dict[str, Any]:
    return {"hostname": hostname, "gpu_name": gpu, "gpu_count": 1 if gpu else 0, "gpu_mem_gb": mem, "gpu_pcie": None,
            "cuda_version": "12.8" if gpu else None, "torch_version": "2.13.0", "cpu_model": cpu, "ram_gb": ram,
            "nvme_device": "nvme0n1p4", "nvme_model": nvme, "nvme_pcie": None, "device": "cuda" if gpu else "cpu",
            "engine_version": "0.1.0"}


# host name → (fingerprint, speed relative to an H100 box, probe figures GB/s: SSD, H2D, HBM)
HOSTS: dict[str, tuple[dict[str, Any], float, tuple[float, float, float]]] = {
    "h100-a": (_fp("gpu-h100-a", "NVIDIA H100 80GB HBM3", 79.1, "SAMSUNG MZWLO3T8HCLS", "AMD EPYC 9654", 503.2),
               1.0, (6.8, 52.0, 2900.0)),
    "h100-b": (_fp("gpu-h100-b", "NVIDIA H100 80GB HBM3", 79.1, "SAMSUNG MZWLO3T8HCLS", "AMD EPYC 9654", 503.2),
               1.0, (6.7, 51.0, 2890.0)),
    "h200": (_fp("gpu-h200-a", "NVIDIA H200", 139.8, "KIOXIA KCMYXRUG7T68", "Intel Xeon Platinum 8480+", 2015.0),
             1.3, (12.5, 55.0, 4300.0)),
    "l40s": (_fp("gpu-l40s-a", "NVIDIA L40S", 44.4, "Micron 7450 MTFDKCC3T8TFR", "AMD EPYC 7763", 251.0),
             0.55, (3.1, 24.0, 780.0)),
}
# decode ms per step and prefill µs per prompt token on an H100 box, by mode
DECODE_MS = {"gpu": 9.0, "cpu": 38.0, "ssd": 140.0, "mixed": 62.0}
PREFILL_US = {"gpu": 40.0, "cpu": 160.0, "ssd": 420.0, "mixed": 240.0}
_CONFIGS: dict[str, dict[str, Any]] = {}


def suite(text: str = SUITE_YAML) -> Suite:
    return parse_suite(text, source="fake-nightly.yaml")


STEPS = (0.02, 0.01)  # per-step jitter of the decode latencies, and the share of steps that stall (2x)


def night(s: Suite, host: str, suite_run_id: str, when: datetime, rng: np.random.Generator, *,
          commit: str = COMMITS[0], noise: float = 0.03, night_sd: float = 0.02,
          slow: float | dict[str, float] = 1.0, fail: dict[str, str] | None = None,
          steps: tuple[float, float] = STEPS) -> list[dict[str, Any]]:
    """The runs of suite `s` that `host` takes in one suite run: one row per spec whose selector
    names the host's GPU model (configs × repeats).

    `slow`: time factor for all configs, or per config key. `fail`: config key → error of failed runs.
    `steps`: see STEPS; (0, 0) makes every time metric's run-to-run noise exactly `noise` (lognormal).
    """
    shared = math.exp(rng.normal(0.0, night_sd))
    rows = []
    for i, spec in enumerate(specs_for(s, host)):
        t0 = when + timedelta(seconds=20 * i)
        if fail and spec.config_key in fail:
            outcome = RunOutcome("failed", fail[spec.config_key], None, HOSTS[host][0], f"node-{host}",
                                 t0.timestamp(), t0.timestamp() + 3, commit, False)
        else:
            factor = slow.get(spec.config_key, 1.0) if isinstance(slow, dict) else slow
            result = engine_result(spec, host, rng, factor * shared, noise, steps)
            e2e = result["metrics"]["e2e_ms"] / 1e3
            outcome = RunOutcome("ok", None, result, HOSTS[host][0], f"node-{host}", t0.timestamp(),
                                 t0.timestamp() + e2e, commit, False)
        row = build_row(spec, suite_run_id, outcome)
        rows.append({**row, "suite": s.name, "date": f"{t0:%Y-%m-%d}"})
    return rows


def config_key(s: Suite, mode: str, batch_size: int, topk_blk: int = 0) -> str:
    """The config key of a point of the suite's matrix."""
    return next(sp.config_key for sp in s.specs if (sp.flat["mode"], sp.flat["batch_size"], sp.flat["topk_blk"])
                == (mode, batch_size, topk_blk))


def specs_for(s: Suite, host: str) -> list[RunSpec]:
    gpu = HOSTS[host][0]["gpu_name"] or ""
    return [sp for sp in s.specs if sp.selector.gpu is None or sp.selector.gpu.lower() in gpu.lower()]


def engine_result(spec: RunSpec, host: str, rng: np.random.Generator, factor: float, noise: float,
                  steps: tuple[float, float] = STEPS) -> dict[str, Any]:
    """A result document as worker.run.run returns it, from the performance model."""
    fp, speed, (ssd_bw, h2d_bw, hbm_bw) = HOSTS[host]
    f = spec.flat
    mode, batch, plen, new = f["mode"], f["batch_size"], f["prompt_len"], f["max_new_tokens"]
    step_ms = DECODE_MS[mode] * (1 + 0.04 * (batch - 1)) * (0.8 if f["topk_blk"] else 1.0) / speed
    ideal_prefill = PREFILL_US[mode] * plen * batch / 1e3 / speed
    prefill = ideal_prefill * factor * math.exp(rng.normal(0.0, noise))
    itl = step_ms * factor * math.exp(rng.normal(0.0, noise)) * np.exp(rng.normal(0.0, steps[0], new - 1))
    itl[rng.random(new - 1) < steps[1]] *= 2.0  # the odd slow step
    decode = float(itl.sum())
    p50, p90, p99 = (_percentile(sorted(itl.tolist()), q) for q in (50, 90, 99))
    streamed = mode in ("ssd", "mixed")
    weight_bytes = 16_060_000_000
    io_ssd = {"bytes": weight_bytes // 2, "busy_s": decode / 1e3, "gbps": ssd_bw * 0.9 / factor} if streamed else None
    io_h2d = None if mode == "gpu" else {"bytes": weight_bytes, "busy_s": decode / 2e3, "gbps": h2d_bw * 0.8 / factor}
    kv = {"bytes": 2_000_000 * batch, "busy_s": 0.01, "gbps": h2d_bw * 0.3} if batch > 1 and mode != "gpu" else None
    floor_decode = step_ms * (new - 1) / 1e3 * 0.93
    return {
        "schema": "streambench.run/1", "status": "ok", "config": _config(spec),
        "model": {"name": spec.model.name, "n_layers": 32, "dtype": "bfloat16", "n_params": 8_030_000_000,
                  "weight_bytes": weight_bytes},
        "system": {k: fp[k] for k in ("hostname", "device", "gpu_name", "gpu_count", "gpu_mem_gb", "cuda_version",
                                      "torch_version", "cpu_model", "ram_gb", "engine_version")},
        "metrics": {"ttft_ms": prefill + 0.4, "prefill_ms": prefill, "decode_ms": decode,
                    "decode_tok_s": batch * (new - 1) / (decode / 1e3), "e2e_ms": prefill + 0.4 + decode,
                    "itl_ms": itl.tolist(), "itl_p50_ms": p50, "itl_p90_ms": p90, "itl_p99_ms": p99,
                    "batch_size": batch, "prompt_len": plen, "generated_tokens": batch * new,
                    "gpu_max_allocated_gb": 17.5 if mode == "gpu" else 6.0 + 0.2 * batch,
                    "gpu_max_reserved_gb": 18.0 if mode == "gpu" else 7.0 + 0.2 * batch, "host_rss_gb": 12.0,
                    "pinned_host_gb": None if mode == "gpu" else 8.5},
        "io": {"ssd_read": io_ssd, "weight_h2d": io_h2d, "kv_h2d": kv, "kv_d2h": kv},
        "roofline": {"ssd_gbps": ssd_bw, "h2d_gbps": h2d_bw, "hbm_gbps": hbm_bw,
                     "floor_prefill_s": ideal_prefill / 1e3 * 0.9, "floor_decode_s": floor_decode,
                     "attainment_prefill": ideal_prefill * 0.9 / prefill,
                     "attainment_decode": floor_decode * 1e3 / decode},
        "warnings": [], "outputs": [{"token_ids": [7] * new} for _ in range(batch)],
    }


def history(s: Suite, hosts: list[str], nights: int, seed: int = 0, *, start: datetime = START,
            noise: float = 0.03, night_sd: float = 0.02, step: dict[str, Any] | None = None,
            bad_nights: dict[tuple[int, str], float] | None = None,
            steps: tuple[float, float] = STEPS) -> list[dict[str, Any]]:
    """`nights` nightly suite runs, one a day, each on every host in `hosts`.

    step: {"night": first night affected, "host": host or None for all, "slow": factor or {config_key: factor},
    "commit": commit from that night on}. bad_nights: (night, host) → time factor of every run of that
    night on that host (a hiccup: a neighbour job, a throttled SSD).
    """
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for n in range(nights):
        when = start + timedelta(days=n)
        sr = f"{s.name}-{when:%Y%m%d}-{n:04x}"
        for host in hosts:
            stepped = step is not None and n >= step["night"] and step.get("host") in (None, host)
            commit = step.get("commit", COMMITS[1]) if stepped else COMMITS[0]
            slow = step["slow"] if stepped else 1.0
            if bad_nights and (n, host) in bad_nights:
                slow = bad_nights[(n, host)]
            rows += night(s, host, sr, when, rng, commit=commit, noise=noise, night_sd=night_sd, slow=slow,
                          steps=steps)
    return rows


def table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as read_results would return them (SCHEMA, partition columns included)."""
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write(uri: str, rows: list[dict[str, Any]]) -> None:
    """Store rows with the real writer, into their `date=` / `suite=` partitions."""
    for row in rows:
        write_row(uri, row, row["suite"], row["date"])


OLD_DROPPED = ("probe_ssd_gbps", "probe_h2d_gbps", "probe_hbm_gbps", "floor_prefill_s", "floor_decode_s",
               "attainment_prefill", "attainment_decode", "itl_p90_ms", "gpu_pcie", "pinned_host_gb", "warnings",
               "output_token_ids", "config_json", "host_selector")


def write_old_schema(uri: str, rows: list[dict[str, Any]], version: int = 0) -> None:
    """Store rows as a writer of an older schema version did: fewer columns, same layout."""
    fs, base = open_uri(uri)
    schema = pa.schema([f for f in FILE_SCHEMA if f.name not in OLD_DROPPED])
    for row in rows:
        path = run_file(base, row["date"], row["suite"], row["suite_run_id"], row["run_id"])
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(pa.Table.from_pylist([{**row, "schema_version": version}], schema=schema), path, filesystem=fs)


def _percentile(x: list[float], q: float) -> float:
    """numpy's default (linear) percentile of a sorted list, without numpy's per-call overhead."""
    pos = (len(x) - 1) * q / 100
    lo = int(pos)
    return x[lo] + (x[min(lo + 1, len(x) - 1)] - x[lo]) * (pos - lo)


def _config(spec: RunSpec) -> dict[str, Any]:
    if spec.spec_hash not in _CONFIGS:
        _CONFIGS[spec.spec_hash] = spec.config(f"preset:{spec.model.preset}").to_dict()
    return _CONFIGS[spec.spec_hash]


def demo_dataset(uri: str, nights: int = 12) -> list[dict[str, Any]]:
    """The dataset behind tests/test_report.py and docs/report.png: three GPU models, `nights` nights,
    a 30% slowdown of one config on the H100 box in the last night (a new commit), one config out
    of memory on the L40S that night, and the first two nights written by an older schema version.

        python -c "from tests import fakerows; fakerows.demo_dataset('/tmp/demo')"
        bench report --results /tmp/demo --out /tmp/demo.html
    """
    s = suite()
    gpu_b8 = config_key(s, "gpu", 8)
    rows = history(s, ["h100-a", "h200", "l40s"], nights, seed=42,
                   step={"night": nights - 1, "host": "h100-a", "slow": {gpu_b8: 1.3}, "commit": COMMITS[2]})
    last = rows[-1]["suite_run_id"]
    oom = config_key(s, "mixed", 8)
    rows = [r for r in rows if not (r["suite_run_id"] == last and r["host"] == "gpu-l40s-a" and r["config_key"] == oom)]
    when = START + timedelta(days=nights - 1, hours=1)
    failed = night(s, "l40s", last, when, np.random.default_rng(7), commit=COMMITS[2],
                   fail={oom: "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 44.39 GiB total capacity)\n"
                               "  File \"worker/kvcache.py\", line 212, in <module> & spill()"})
    rows += [r for r in failed if r["status"] != "ok"]
    old_dates = {f"{START + timedelta(days=d):%Y-%m-%d}" for d in range(2)}
    write_old_schema(uri, [r for r in rows if r["date"] in old_dates])
    write(uri, [r for r in rows if r["date"] not in old_dates])
    return rows
