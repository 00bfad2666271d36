"""The results schema: one Arrow row per run, ok or failed, versioned.

Bump SCHEMA_VERSION when a column changes meaning or type; adding a column is compatible (older
files read back with the new column null, see orchestrator.results). Values a run cannot know are
null, never a placeholder. The partition columns (`date`, `suite`) live in the dataset's directory
names, not inside the files, so pyarrow, pandas and DuckDB see them exactly once.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from worker.host.hostinfo import hardware_key
from worker.host.walltime import PHASES as SETUP_PHASES

if TYPE_CHECKING:
    from orchestrator.cluster.actor import RunOutcome
    from orchestrator.suite.spec import RunSpec

SCHEMA_VERSION = 1

_TS = pa.timestamp("us", tz="UTC")
_F64, _I64, _STR = pa.float64(), pa.int64(), pa.string()

# name, type, description. Order is the column order of the files.
COLUMNS: list[tuple[str, pa.DataType, str]] = [
    ("schema_version", pa.int32(), "SCHEMA_VERSION of the writer"),
    ("suite_run_id", _STR, "one submission of a suite (resubmitting it skips recorded runs)"),
    ("run_id", _STR, "the run within the suite: spec hash prefix + repeat"),
    ("spec_hash", _STR, "hash of resolved config + model + host selector"),
    ("config_key", _STR, "hash of resolved config + model: comparable work"),
    ("repeat", pa.int32(), "repeat index of the same spec"),
    ("status", _STR, "ok | failed"),
    ("error", _STR, "why a failed run failed"),
    ("attempts", pa.int32(), "tries, counting retries after actor/node deaths"),
    ("started_at", _TS, "start of the last attempt on the worker"),
    ("finished_at", _TS, "end of the last attempt"),
    ("host", _STR, "hostname of the worker"),
    ("node_id", _STR, "Ray node id"),
    ("host_selector", _STR, "the run's selector, JSON"),
    ("hardware_key", _STR, "hash of GPU model/count/HBM/PCIe, NVMe model, RAM, CPU model"),
    ("git_commit", _STR, "commit of the worker's source tree"),
    ("git_dirty", pa.bool_(), "tracked files differed from that commit"),
    ("engine_version", _STR, ""),
    ("torch_version", _STR, ""),
    ("cuda_version", _STR, ""),
    ("device", _STR, "cuda | cpu"),
    ("gpu_name", _STR, "model of the run's own GPU"),
    ("gpu_index", pa.int32(), "the run's GPU as its process numbers the GPUs it sees (0 in an actor holding one); "
                              "null on CPU"),
    ("gpu_uuid", _STR, "UUID of the run's GPU (GPU-..., as nvidia-smi -L writes it): the physical card; null on CPU"),
    ("cuda_visible_devices", _STR, "CUDA_VISIBLE_DEVICES of the run's process (set by Ray for an actor holding a "
                                   "GPU: the GPU id Ray assigned); null where unset or empty"),
    ("gpu_count", pa.int32(), "GPUs visible to the run"),
    ("gpu_mem_gb", _F64, ""),
    ("gpu_pcie", _STR, "GPU PCIe link"),
    ("cpu_model", _STR, ""),
    ("ram_gb", _F64, ""),
    ("nvme_device", _STR, "the NVMe device the run held"),
    ("nvme_model", _STR, ""),
    ("model", _STR, "model name in the suite"),
    ("model_source", _STR, "checkpoint path or preset, JSON"),
    ("n_layers", pa.int32(), ""),
    ("dtype", _STR, ""),
    ("n_params", _I64, ""),
    ("weight_bytes", _I64, ""),
    ("weight_format", _STR, "native | int8 | int4 | fp8: how the pack stored the projections"),
    ("mode", _STR, "gpu | cpu | ssd | mixed"),
    ("engine", _STR, "streaming | accelerate"),
    ("batch_size", pa.int32(), ""),
    ("prompt_len", pa.int32(), "prompt tokens per row (measured when ok, configured when failed)"),
    ("max_new_tokens", pa.int32(), ""),
    ("generated_tokens", _I64, ""),
    ("ttft_ms", _F64, ""),
    ("prefill_ms", _F64, ""),
    ("decode_ms", _F64, ""),
    ("decode_tok_s", _F64, ""),
    ("e2e_ms", _F64, ""),
    ("itl_p50_ms", _F64, ""),
    ("itl_p90_ms", _F64, ""),
    ("itl_p99_ms", _F64, ""),
    ("ssd_read_gbps", _F64, ""),
    ("ssd_read_bytes", _I64, ""),
    ("weight_h2d_gbps", _F64, ""),
    ("weight_h2d_bytes", _I64, ""),
    ("kv_h2d_gbps", _F64, ""),
    ("kv_d2h_gbps", _F64, ""),
    ("kv_ssd_gbps", _F64, "KV spill file, writes and reads together"),
    ("kv_ssd_bytes", _I64, "KV bytes written to and read back from the SSD spill file"),
    ("kv_gpu_gb", _F64, "KV cache held on the GPU (blocks + working buffers)"),
    ("kv_cpu_gb", _F64, "KV cache held in pinned CPU memory"),
    ("kv_ssd_gb", _F64, "KV cache spill file size"),
    ("kv_write_backoffs", _I64, "KV write-back throttle back-offs"),
    ("topk_budget_tokens", _I64, ("top-k budget per (row, layer) in tokens as asked (topk_tokens, else topk_blk "
                                  "blocks); 0 = exact attention")),
    ("topk_blocks", _I64, "top-k budget per (row, layer) in KV blocks; 0 = exact attention"),
    ("kv_blocks_read_per_step", _F64, "mean KV blocks fetched from the host tier per (row, layer) decode step"),
    ("kv_bytes_per_step", _F64, "KV bytes fetched from the host tier per decode step, every row and layer"),
    ("gpu_alloc_gb", _F64, "GPU max allocated"),
    ("gpu_reserved_gb", _F64, "GPU max reserved"),
    ("host_rss_gb", _F64, ""),
    ("pinned_host_gb", _F64, ""),
    ("probe_ssd_gbps", _F64, "the host probe's SSD figure (cached per host; a run that reads the SSD floors on "
                             "floor_ssd_gbps)"),
    ("probe_h2d_gbps", _F64, ""),
    ("probe_hbm_gbps", _F64, ""),
    ("floor_prefill_s", _F64, ""),
    ("floor_decode_s", _F64, ""),
    ("attainment_prefill", _F64, "floor / measured"),
    ("attainment_decode", _F64, "floor / measured"),
    ("ssd_before_gbps", _F64, "SSD read rate with the SSD tier's settings just before the engine was built"),
    ("ssd_after_gbps", _F64, "the same just after the engine was closed"),
    ("floor_ssd_gbps", _F64, "the SSD rate the floor used: the higher of before/after (else the probe's); null "
                             "when the run reads nothing from the SSD"),
    ("floor_ssd_spread", _F64, "|before - after| / mean: how far the disk drifted across the run"),
    ("floor_suspect", pa.bool_(), "an attainment above 1.05: the floor's figures were too low, the run did not "
                                  "beat the hardware"),
    ("compiled_from_cache", pa.bool_(), "every graph the run compiled came from the host's compile cache (null: "
                                        "nothing compiled, e.g. a CPU run or a later run in the same process)"),
    ("reused_engine", pa.bool_(), "the run measured an engine kept from an earlier run of its suite on this worker "
                                  "(`reuse: weights`; worker.host.reuse); null in rows from before the key"),
    ("pack_check", _STR, "how the pack was checked before the run: full (every checksum) or edges (each "
                          "group's first and last 4 KiB against the last full verification)"),
    ("pack_verified_at", _STR, "when every checksum of the pack was last verified (UTC, ISO 8601)"),
    ("device_wait_s", _F64, "seconds the run waited for its GPU or disk, held by another engine on the host"),
    ("setup_process_s", _F64, "process start (or the process's previous run's end) to the run's start"),
    ("setup_imports_s", _F64, "imports the run made itself (first run of a process)"),
    ("setup_tokenizer_s", _F64, "loading the tokenizer and making the prompts"),
    ("setup_pack_s", _F64, "finding, packing and checking the pack"),
    ("setup_fill_s", _F64, "loading the CPU tier's pinned layers"),
    ("fill_gbps", _F64, "the CPU tier's load rate"),
    ("setup_slots_s", _F64, "the rest of the engine build: resident weights, GPU slots, threads, model"),
    ("setup_compile_s", _F64, "the first warm-up round (compilation on CUDA, first kernels and allocations)"),
    ("setup_warmup_s", _F64, "the later warm-up rounds and CUDA graph capture"),
    ("setup_accuracy_s", _F64, "the comparison with the native weights after the measured round (accuracy_ref)"),
    ("setup_probe_s", _F64, "host probe and the SSD windows next to the run"),
    ("setup_close_s", _F64, "closing the engine"),
    ("setup_other_s", _F64, "the rest outside the measured round: device lock, result document"),
    ("measure_s", _F64, "the measured round, host clock"),
    ("wall_s", _F64, "the run's wall time: every setup phase plus the measured round"),
    ("accuracy_ref", _STR, "what the run's next-token distributions were compared with (native), after the "
                           "measured round; null without --accuracy-ref"),
    ("accuracy_positions", _I64, "generated positions compared (every row's, teacher-forced on the run's tokens)"),
    ("top1_agreement", _F64, "share of those positions where the run's argmax equals the reference's"),
    ("mean_kl", _F64, "mean KL(reference || run) in nats over those positions"),
    ("warnings", pa.list_(_STR), ""),
    ("itl_ms", pa.list_(_F64), "per-token decode latencies"),
    ("output_token_ids", pa.list_(pa.list_(_I64)), "generated tokens per batch row"),
    ("config_json", _STR, "the full resolved RunConfig (nested), JSON"),
]

FILE_SCHEMA = pa.schema([pa.field(n, t, metadata={"doc": d} if d else None) for n, t, d in COLUMNS],
                        metadata={"streambench.schema_version": str(SCHEMA_VERSION)})
# What readers get: the file columns plus the partition columns.
SCHEMA = FILE_SCHEMA.append(pa.field("date", _STR)).append(pa.field("suite", _STR))
COLUMN_NAMES = [n for n, _, _ in COLUMNS]


def build_row(spec: RunSpec, suite_run_id: str, outcome: RunOutcome) -> dict[str, Any]:
    """Flatten one outcome (and its engine result, when there is one) into a row of FILE_SCHEMA."""
    res = outcome.result or {}
    fp = outcome.fingerprint or {}
    system = dict(fp)
    system.update({k: v for k, v in (res.get("system") or {}).items() if v is not None or k not in fp})
    metrics, io, roof = res.get("metrics") or {}, res.get("io") or {}, res.get("roofline") or {}
    setup, near = res.get("setup") or {}, roof.get("ssd_adjacent") or {}
    model = res.get("model") or {}
    row: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "suite_run_id": suite_run_id,
        "run_id": spec.run_id,
        "spec_hash": spec.spec_hash,
        "config_key": spec.config_key,
        "repeat": spec.repeat,
        "status": outcome.status,
        "error": outcome.error,
        "attempts": outcome.attempts,
        "started_at": utc(outcome.started_at),
        "finished_at": utc(outcome.finished_at),
        "host": system.get("hostname"),
        "node_id": outcome.node_id,
        "host_selector": json.dumps(spec.selector.to_dict(), sort_keys=True),
        "hardware_key": hardware_key(system) if fp else None,
        "git_commit": outcome.git_commit,
        "git_dirty": outcome.git_dirty,
        "engine_version": system.get("engine_version"),
        "device": system.get("device"),
        "model": spec.model.name,
        "model_source": json.dumps(spec.model.identity(), sort_keys=True),
        "n_layers": model.get("n_layers", spec.model.layers),
        "dtype": model.get("dtype"),
        "n_params": model.get("n_params"),
        "weight_bytes": model.get("weight_bytes"),
        "weight_format": model.get("weight_format", spec.flat.get("weight_format", "native")),
        "mode": spec.flat.get("mode"),
        "engine": spec.flat.get("engine"),
        "batch_size": metrics.get("batch_size", spec.flat.get("batch_size")),
        "prompt_len": metrics.get("prompt_len", spec.flat.get("prompt_len")),
        "max_new_tokens": spec.flat.get("max_new_tokens"),
        "gpu_alloc_gb": metrics.get("gpu_max_allocated_gb"),
        "gpu_reserved_gb": metrics.get("gpu_max_reserved_gb"),
        "probe_ssd_gbps": roof.get("ssd_gbps"),
        "probe_h2d_gbps": roof.get("h2d_gbps"),
        "probe_hbm_gbps": roof.get("hbm_gbps"),
        "compiled_from_cache": (res.get("compile_cache") or {}).get("compiled_from_cache"),
        "reused_engine": (res.get("reuse") or {}).get("reused_engine"),
        "pack_check": (res.get("pack") or {}).get("check"),
        "pack_verified_at": (res.get("pack") or {}).get("verified_at"),
        "device_wait_s": (res.get("locks") or {}).get("waited_s"),
        "warnings": list(res.get("warnings") or []),
        "output_token_ids": [o.get("token_ids") for o in res.get("outputs") or []] or None,
        "config_json": json.dumps(res.get("config") or spec.config(_checkpoint_of(spec)).to_dict(),
                                  sort_keys=True, default=str),
    }
    for k in ("torch_version", "cuda_version", "gpu_name", "gpu_index", "gpu_uuid", "cuda_visible_devices",
              "gpu_count", "gpu_mem_gb", "gpu_pcie", "cpu_model", "ram_gb", "nvme_device", "nvme_model"):
        row[k] = system.get(k)
    for k in ("generated_tokens", "ttft_ms", "prefill_ms", "decode_ms", "decode_tok_s", "e2e_ms", "itl_p50_ms",
              "itl_p90_ms", "itl_p99_ms", "host_rss_gb", "pinned_host_gb", "itl_ms", "kv_gpu_gb", "kv_cpu_gb",
              "kv_ssd_gb", "kv_write_backoffs", "topk_budget_tokens", "topk_blocks", "kv_blocks_read_per_step",
              "kv_bytes_per_step"):
        row[k] = metrics.get(k)
    for k in ("floor_prefill_s", "floor_decode_s", "attainment_prefill", "attainment_decode", "floor_ssd_gbps",
              "floor_suspect"):
        row[k] = roof.get(k)
    row.update(ssd_before_gbps=near.get("before_gbps"), ssd_after_gbps=near.get("after_gbps"),
               floor_ssd_spread=near.get("spread"))
    for k in SETUP_PHASES:
        row[f"setup_{k}_s"] = setup.get(f"{k}_s")
    acc = res.get("accuracy") or {}
    row.update(accuracy_ref=acc.get("ref"), accuracy_positions=acc.get("positions"),
               top1_agreement=acc.get("top1_agreement"), mean_kl=acc.get("mean_kl"))
    row.update(fill_gbps=setup.get("fill_gbps"), measure_s=setup.get("measure_s"), wall_s=setup.get("wall_s"))
    for ch in ("ssd_read", "weight_h2d", "kv_h2d", "kv_d2h", "kv_ssd"):  # kv_ssd: absent unless the KV spilled
        stats = io.get(ch) or {}
        row[f"{ch}_gbps"] = stats.get("gbps")
        if f"{ch}_bytes" in COLUMN_NAMES:
            row[f"{ch}_bytes"] = stats.get("bytes")
    assert set(row) == set(COLUMN_NAMES), set(row) ^ set(COLUMN_NAMES)
    return row


def _checkpoint_of(spec: RunSpec) -> str:
    return spec.model.path or f"preset:{spec.model.preset}"


def utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)
