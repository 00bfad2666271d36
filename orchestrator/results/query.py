"""Which rows a comparison, regression check or report looks at, and how to name what is in them.

Reading goes through `orchestrator.results.store.read_results` (suite, suite run and time filters are
pushed down to the dataset); commit and host filters are applied here because they match by prefix
or by GPU model. Rows are plain dicts of the columns these commands use.

Labels: a config key is a hash, so rows are shown as `model · mode · b<batch> · p<prompt>→<new>`
plus the config values that tell apart configs sharing those (`topk_blk=8`). A hardware
key already starts with the GPU model (`h100-80gb-hbm3x1-…`); `hardware_info` adds what the rows
say about it (GPU, NVMe, CPU, RAM, host names, probe figures).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from orchestrator.regress.metrics import CHANNELS, METRICS
from orchestrator.results.store import read_results
from orchestrator.suite.load import NOT_IN_CONFIG_KEY
from orchestrator.suite.selector import model_matches

ID_COLUMNS = ("suite", "date", "suite_run_id", "run_id", "config_key", "hardware_key", "repeat", "status", "error",
              "attempts", "started_at", "finished_at", "host", "git_commit", "gpu_name", "gpu_count", "gpu_mem_gb",
              "cpu_model", "ram_gb", "nvme_device", "nvme_model", "device", "model", "mode", "engine", "batch_size",
              "prompt_len", "max_new_tokens", "config_json", "schema_version",
              "probe_ssd_gbps", "probe_h2d_gbps", "probe_hbm_gbps")
# how far a run's floor holds (the report's suspect-floor section)
FLOOR_COLUMNS = ("attainment_prefill", "attainment_decode", "floor_suspect", "ssd_before_gbps", "ssd_after_gbps",
                 "floor_ssd_gbps", "floor_ssd_spread")
COLUMNS = ID_COLUMNS + tuple(m for m in METRICS if m not in ID_COLUMNS) + tuple(
    c for c, _ in CHANNELS if c not in METRICS) + tuple(c for c in FLOOR_COLUMNS if c not in METRICS)
FILTER_COLUMNS = ("git_commit", "host", "hardware_key", "gpu_name")  # what filter_rows reads
LABEL_FIELDS = ("model", "mode", "batch_size", "prompt_len", "max_new_tokens", "engine")
MAX_EXTRA_LABEL_FIELDS = 4


@dataclass(frozen=True)
class Selection:
    """Filters over the dataset; empty tuples and None mean "all"."""

    suites: tuple[str, ...] = ()
    suite_run_ids: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    commits: tuple[str, ...] = ()  # commit prefixes
    hosts: tuple[str, ...] = ()  # host names, hardware key prefixes or GPU model substrings (`h100`)
    status: str | None = None

    def describe(self) -> str:
        parts = [f"{k}={','.join(v)}" for k, v in (("suite", self.suites), ("suite run", self.suite_run_ids),
                                                     ("commit", self.commits), ("host", self.hosts)) if v]
        parts += [f"{k} {v:%Y-%m-%d %H:%M}" for k, v in (("since", self.since), ("until", self.until)) if v]
        return ", ".join(parts) or "all runs"


@dataclass(frozen=True)
class HardwareInfo:
    key: str
    gpu: str
    nvme: str
    cpu: str
    ram_gb: float | None
    hosts: tuple[str, ...]
    probe: dict[str, float | None]  # probe_*_gbps medians over the rows

    def describe(self) -> str:
        ram = f"{self.ram_gb:.0f} GB RAM" if self.ram_gb else "RAM ?"
        return f"{self.gpu} · NVMe {self.nvme} · {self.cpu} · {ram} · hosts {', '.join(self.hosts) or '?'}"


def select(uri: str | None, sel: Selection = Selection()) -> list[dict[str, Any]]:
    """The rows of the dataset matching `sel`, oldest first."""
    table = read_results(uri, suite=sel.suites or None, suite_run_id=sel.suite_run_ids or None, status=sel.status,
                         since=sel.since, until=sel.until, columns=list(COLUMNS))
    return filter_rows(to_rows(table), sel)


def select_table(uri: str | None, sel: Selection = Selection(), columns: list[str] | None = None) -> pa.Table:
    """The rows matching `sel` as a table of `columns` (default: every column), oldest first: what
    `bench results` shows. The commit and host filters read their own columns, then drop them."""
    table = read_results(uri, suite=sel.suites or None, suite_run_id=sel.suite_run_ids or None, status=sel.status,
                         since=sel.since, until=sel.until,
                         columns=None if columns is None else list(dict.fromkeys([*columns, *FILTER_COLUMNS])))
    if sel.commits or sel.hosts:
        keep = [bool(filter_rows([r], sel)) for r in table.select(list(FILTER_COLUMNS)).to_pylist()]
        table = table.filter(pa.array(keep, type=pa.bool_()))
    return table if columns is None else table.select(columns)


def to_rows(table: pa.Table) -> list[dict[str, Any]]:
    """A results table as row dicts with every column this package reads (missing ones as None)."""
    missing = [c for c in COLUMNS if c not in table.column_names]
    rows = table.select([c for c in COLUMNS if c in table.column_names]).to_pylist()
    for r in rows:
        for c in missing:
            r[c] = None
    return rows


def filter_rows(rows: list[dict[str, Any]], sel: Selection) -> list[dict[str, Any]]:
    """Apply the prefix and host filters of `sel` (the rest was pushed down to the reader)."""
    out = rows
    if sel.commits:
        out = [r for r in out if r["git_commit"] and any(r["git_commit"].startswith(c) for c in sel.commits)]
    if sel.hosts:
        out = [r for r in out if any(host_matches(h, r) for h in sel.hosts)]
    return out


def host_matches(want: str, row: dict[str, Any]) -> bool:
    if want in (row["host"], (row["host"] or "").split(".")[0]):
        return True
    if row["hardware_key"] and row["hardware_key"].startswith(want):
        return True
    return model_matches(want, row["gpu_name"])


def newest_suite_run(rows: list[dict[str, Any]]) -> str | None:
    """The suite run whose last row finished last."""
    last: dict[str, datetime] = {}
    for r in rows:
        t = r["finished_at"] or r["started_at"]
        if t is not None and (r["suite_run_id"] not in last or t > last[r["suite_run_id"]]):
            last[r["suite_run_id"]] = t
    return max(last, key=last.__getitem__) if last else None


def short_commit(commit: str | None) -> str:
    return commit[:10] if commit else "unknown"


def flat_config(row: dict[str, Any]) -> dict[str, Any]:
    """The row's resolved config as flat leaf names (without host-local paths and log switches)."""
    try:
        nested = json.loads(row["config_json"]) if row.get("config_json") else {}
    except json.JSONDecodeError:
        nested = {}
    flat: dict[str, Any] = {}
    for k, v in nested.items():
        flat.update(v if isinstance(v, dict) else {k: v})
    for k in NOT_IN_CONFIG_KEY:
        flat.pop(k, None)
    for k in LABEL_FIELDS:  # configured values win (an ok row's prompt_len column is the measured one)
        if flat.get(k) is None or k == "model":
            flat[k] = row.get(k)
    return flat


def config_labels(rows: Iterable[dict[str, Any]]) -> dict[str, str]:
    """config_key → a readable, unique label: the main fields, plus the values that tell apart configs
    that share them (`topk_blk=8`), plus a key prefix if even that does not."""
    configs: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["config_key"] and (r["config_key"] not in configs or r["status"] == "ok"):
            configs[r["config_key"]] = flat_config(r)
    groups: dict[str, list[str]] = defaultdict(list)
    for key, c in configs.items():
        engine = "" if c.get("engine") in (None, "streaming") else f" · {c['engine']}"
        groups[(f"{c.get('model') or '?'} · {c.get('mode') or '?'} · b{c.get('batch_size')} · "
                f"p{c.get('prompt_len')}→{c.get('max_new_tokens')}{engine}")].append(key)
    labels = {}
    for base, keys in groups.items():
        names = sorted({k for key in keys for k in configs[key]} - set(LABEL_FIELDS))
        differing = [n for n in names if len({json.dumps(configs[key].get(n), sort_keys=True) for key in keys}) > 1]
        for key in keys:
            extras = [f"{n}={configs[key].get(n)}" for n in differing[:MAX_EXTRA_LABEL_FIELDS]]
            labels[key] = " · ".join([base, *extras])
    seen: dict[str, int] = defaultdict(int)
    for label in labels.values():
        seen[label] += 1
    return {k: (f"{v} [{k[:6]}]" if seen[v] > 1 else v) for k, v in sorted(labels.items(), key=lambda kv: kv[1])}


def hardware_info(rows: Iterable[dict[str, Any]]) -> dict[str, HardwareInfo]:
    """hardware_key → what the rows say about that hardware, ordered by GPU model then key."""
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["hardware_key"]:
            by_key[r["hardware_key"]].append(r)
    out = {}
    for key in sorted(by_key, key=lambda k: (k.split("-")[0], k)):
        rs = by_key[key]
        first = next((r for r in reversed(rs) if r["status"] == "ok"), rs[-1])
        gpu = f"{first['gpu_count'] or 1} × {first['gpu_name']}" if first["gpu_name"] else "CPU only"
        if first["gpu_mem_gb"]:
            gpu += f" ({first['gpu_mem_gb']:.0f} GB)"
        probe = {}
        for c in ("probe_ssd_gbps", "probe_h2d_gbps", "probe_hbm_gbps"):
            vals = [r[c] for r in rs if r[c] is not None]
            probe[c] = float(np.median(vals)) if vals else None
        out[key] = HardwareInfo(key, gpu, first["nvme_model"] or "?", first["cpu_model"] or "?", first["ram_gb"],
                                tuple(sorted({r["host"] for r in rs if r["host"]})), probe)
    return out

