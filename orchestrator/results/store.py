"""The results dataset: one Parquet file per finished run, hive-partitioned by date and suite.

Layout: `<uri>/date=YYYY-MM-DD/suite=NAME/<suite_run_id>__<run_id>.parquet`, on any pyarrow filesystem
(a local path, file://, s3://, gs://, hdfs://). A row is written as a hidden temp file (readers skip
names starting with "."; DuckDB's `*.parquet` glob does not match `.tmp`) and renamed into place, so a
reader never sees half a file and a failed write leaves nothing. The file name is the run's identity:
rewriting a run (a failed run resubmitted) replaces its row instead of adding one.

`read_results` is the public reader the comparison and regression code builds on.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.results.schema import FILE_SCHEMA, SCHEMA
from worker import envs
from worker.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_URI = "./bench-results"
_PARTITIONING = ds.partitioning(pa.schema([("date", pa.string()), ("suite", pa.string())]), flavor="hive")


@dataclass(frozen=True)
class Recorded:
    """A run already in the dataset."""

    run_id: str
    status: str
    path: str


def default_uri() -> str:
    return envs.results_uri() or DEFAULT_URI


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, base path) for a local path or a filesystem URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        raise UserError(f"--results {uri!r}: not a usable filesystem URI ({e})") from None


def _where(uri: str) -> tuple[pafs.FileSystem, str, pafs.FileType]:
    fs, base = open_uri(uri)
    try:
        return fs, base, fs.get_file_info(base).type
    except OSError as e:
        raise UserError(f"--results {uri}: cannot reach it ({e})") from None


def check_writable(uri: str) -> None:
    """Fail before any work starts when rows could not be written to `uri`: a regular file in the
    way, no permission, a read-only or full disk (a hidden probe file is written and removed)."""
    fs, base, kind = _where(uri)
    if kind == pafs.FileType.File:
        raise UserError(f"--results {uri} is a file, not a results directory: point it at a directory (a new one "
                        "is created) or at a dataset `bench submit` wrote")
    probe = f"{base}/.write-check-{uuid.uuid4().hex[:8]}"
    try:
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"\0" * 65536)  # about one row: a full disk fails here, not after the first run
    except OSError as e:
        raise UserError(f"--results {uri}: rows cannot be written there ({' '.join(str(e).split())})") from None
    finally:
        _delete_quietly(fs, probe)


def require_dataset(uri: str | None) -> None:
    """For the commands that read a dataset: one that does not exist is a mistake, not an empty table."""
    uri = uri or default_uri()
    _, _, kind = _where(uri)
    if kind == pafs.FileType.NotFound:
        raise UserError(f"--results {uri} does not exist: no runs were recorded there; run `bench submit` first "
                        "or point --results (or STREAMBENCH_RESULTS) at the dataset")
    if kind != pafs.FileType.Directory:
        raise UserError(f"--results {uri} is a file, not a results directory")


def run_file(base: str, date: str, suite: str, suite_run_id: str, run_id: str) -> str:
    return f"{base}/date={date}/suite={suite}/{suite_run_id}__{run_id}.parquet"


def write_row(uri: str, row: dict[str, Any], suite: str, date: str) -> str:
    """Write one run's row atomically; return its path. Replaces an earlier row of the same run."""
    fs, base = open_uri(uri)
    path = run_file(base, date, suite, row["suite_run_id"], row["run_id"])
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    table = pa.Table.from_pylist([row], schema=FILE_SCHEMA)
    table = table.replace_schema_metadata({**(FILE_SCHEMA.metadata or {}), b"streambench.suite": suite.encode()})
    try:
        fs.create_dir(parent, recursive=True)
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, path)
    except BaseException:
        _delete_quietly(fs, tmp)
        raise
    log.debug("wrote %s", path)
    return path


def recorded(uri: str, suite: str, suite_run_id: str) -> dict[str, Recorded]:
    """Runs of one suite run already in the dataset, by run id (reads only that suite's partitions)."""
    fs, base = open_uri(uri)
    prefix = f"{suite_run_id}__"
    out: dict[str, Recorded] = {}
    for day in _list(fs, base, recursive=False):
        if day.type != pafs.FileType.Directory or not day.base_name.startswith("date="):
            continue
        for info in _list(fs, f"{day.path}/suite={suite}", recursive=False):
            if info.type == pafs.FileType.File and info.base_name.startswith(prefix) and info.base_name.endswith(
                    ".parquet") and not _not_ours(fs, info):
                row = pq.read_table(info.path, columns=["run_id", "status"], filesystem=fs).to_pylist()[0]
                out[row["run_id"]] = Recorded(row["run_id"], row["status"], info.path)
    return out


def remove(uri: str, path: str) -> None:
    fs, _ = open_uri(uri)
    _delete_quietly(fs, path)


def read_results(uri: str | None = None, *, suite: str | Iterable[str] | None = None,
                 suite_run_id: str | Iterable[str] | None = None, status: str | None = None,
                 config_key: str | Iterable[str] | None = None, hardware_key: str | Iterable[str] | None = None,
                 since: datetime | None = None, until: datetime | None = None,
                 filter: pc.Expression | None = None, columns: list[str] | None = None) -> pa.Table:
    """Every row of the dataset at `uri` (default: --results default) as one Table in SCHEMA.

    Files of older schema versions read with the columns they lack as nulls. Filters combine with AND;
    string filters accept one value or several; `since`/`until` bound `finished_at`; `filter` is any
    pyarrow compute expression. Rows are sorted by finished_at, then run_id. A missing dataset reads as
    an empty table.
    """
    fs, base = open_uri(uri or default_uri())
    schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in _known(columns)])
    try:
        info = fs.get_file_info(base)
    except OSError as e:
        raise UserError(f"results {uri!r}: cannot read ({e})") from None
    if info.type != pafs.FileType.Directory:
        return schema.empty_table()
    files = result_files(fs, base)
    if not files:
        return schema.empty_table()
    dataset = ds.dataset(files, filesystem=fs, format="parquet", schema=SCHEMA, partitioning=_PARTITIONING,
                         partition_base_dir=base)
    expr = _filters(suite=suite, suite_run_id=suite_run_id, status=status, config_key=config_key,
                    hardware_key=hardware_key)
    if since is not None:
        expr = _and(expr, pc.field("finished_at") >= pa.scalar(since, SCHEMA.field("finished_at").type))
    if until is not None:
        expr = _and(expr, pc.field("finished_at") < pa.scalar(until, SCHEMA.field("finished_at").type))
    expr = _and(expr, filter)
    table = dataset.to_table(filter=expr, columns=schema.names)
    keys = [(k, "ascending") for k in ("finished_at", "run_id") if k in table.column_names]
    return table.sort_by(keys) if keys and table.num_rows else table


def result_files(fs: pafs.FileSystem, base: str) -> list[str]:
    """The dataset's row files: every `*.parquet` under `base` that holds streambench rows. A file
    that is not Parquet, or Parquet of another schema (no run identity), is skipped with one warning
    naming it: one stray file must not stop `bench regress` (whose exit 1 a nightly reads as a
    regression) nor hide every other row. Hidden names (`.tmp` writes, `_running` claims) are not data."""
    good, bad = [], []
    for info in _list(fs, base, recursive=True):
        rel = info.path[len(base):].lstrip("/").split("/")
        if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet") \
                or any(part.startswith((".", "_")) for part in rel):
            continue
        why = _not_ours(fs, info)
        (bad.append(f"{info.path} ({why})") if why else good.append(info.path))
    if bad:
        log.warning("skipped %d file(s) in the results dataset that are not streambench rows: %s", len(bad),
                    "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""))
    return good


_IDENTITY = ("schema_version", "suite_run_id", "run_id", "status")
_checked: dict[tuple[str, int, int], str | None] = {}  # (path, size, mtime) → why not ours; files only grow new


def _not_ours(fs: pafs.FileSystem, info: pafs.FileInfo) -> str | None:
    key = (info.path, info.size or 0, info.mtime_ns or 0)
    if key not in _checked:
        try:
            names = pq.read_schema(info.path, filesystem=fs).names
            missing = [c for c in _IDENTITY if c not in names]
            _checked[key] = f"no {missing[0]} column: another schema" if missing else None
        except (pa.ArrowInvalid, OSError) as e:
            _checked[key] = f"unreadable: {' '.join(str(e).split())[:120]}"
    return _checked[key]


def _known(columns: list[str]) -> list[str]:
    unknown = [c for c in columns if c not in SCHEMA.names]
    if unknown:
        raise UserError(f"unknown result column {unknown[0]!r}; columns: {', '.join(SCHEMA.names)}")
    return columns


def _filters(**values: str | Iterable[str] | None) -> pc.Expression | None:
    expr = None
    for name, value in values.items():
        if value is None:
            continue
        wanted = [value] if isinstance(value, str) else list(value)
        expr = _and(expr, pc.field(name).isin(wanted))
    return expr


def _and(a: pc.Expression | None, b: pc.Expression | None) -> pc.Expression | None:
    if a is None:
        return b
    return a if b is None else a & b


def _list(fs: pafs.FileSystem, path: str, recursive: bool) -> list[pafs.FileInfo]:
    try:
        return fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass
