"""`bench compare`: hosts as columns, readable configs as rows, ratios, noise, commits side by side."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone

import pytest
from click.testing import CliRunner

import cli
from orchestrator.regress.compare import compare, resolve_ref, to_csv, to_markdown, to_rich
from orchestrator.results.query import Selection, config_labels, select
from tests import fakerows
from worker.errors import UserError

SUITE = fakerows.suite()
HOSTS = ["h100-a", "h200", "l40s"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 nights on three GPU models; h100-a moves to a slower commit on the last night; the first
    night was written by an older schema version."""
    uri = str(tmp_path_factory.mktemp("compare") / "results")
    rows = fakerows.history(SUITE, HOSTS, 4, seed=21, step={"night": 3, "host": "h100-a", "slow": 1.25})
    fakerows.write_old_schema(uri, [r for r in rows if r["date"] == "2026-11-01"])
    fakerows.write(uri, [r for r in rows if r["date"] != "2026-11-01"])
    return uri, rows


def hw_of(rows, host):
    return next(r["hardware_key"] for r in rows if r["host"] == fakerows.HOSTS[host][0]["hostname"])


def test_one_table_per_metric_hosts_as_columns_configs_as_rows(dataset):
    uri, rows = dataset
    got = select(uri)
    assert len(got) == len(rows) and {r["schema_version"] for r in got} == {0, 1}  # the old files read too
    comp = compare(got, ["decode_tok_s", "ttft_ms"])
    t = comp.tables[0]
    assert [m.metric.name for m in comp.tables] == ["decode_tok_s", "ttft_ms"]
    assert set(t.columns) == {hw_of(rows, h) for h in HOSTS} and t.ref == t.columns[0]
    assert len(t.rows) == 5 and all(k[1] is None for k in t.rows)
    labels = sorted(t.labels.values())
    assert "llama3.1-8b · gpu · b1 · p512→32" in labels
    mixed_b1 = "llama3.1-8b · mixed · b1 · p512→32"
    assert {f"{mixed_b1} · topk_blk=0", f"{mixed_b1} · topk_blk=8"} <= set(labels)
    cell = t.cells[(t.rows[0], hw_of(rows, "h200"))]
    assert cell.summary.n == 12 and 0 < cell.summary.spread < 0.1  # 4 nights × 3 repeats, noise shown
    # the H200 is 1.3x an H100 in the performance model; the L40S 0.55x (H100 pooled over both commits)
    ref = comp.tables[0].ref
    assert ref == hw_of(rows, "h100-a")
    assert cell.ratio == pytest.approx(1.3 * 1.0, rel=0.15)
    assert t.cells[(t.rows[0], hw_of(rows, "l40s"))].ratio == pytest.approx(0.55, rel=0.15)
    assert comp.notes and "2 commits pooled" in comp.notes[0]


def test_reference_by_gpu_model_or_host_name(dataset):
    uri, rows = dataset
    got = select(uri)
    comp = compare(got, ["decode_tok_s"], ref="h200")
    t = comp.tables[0]
    assert t.ref == hw_of(rows, "h200") and t.cells[(t.rows[0], t.ref)].ratio == 1.0
    assert resolve_ref("gpu-l40s-a", t.columns, "hardware", got) == hw_of(rows, "l40s")
    with pytest.raises(UserError, match="matches none of the hardware keys"):
        compare(got, ["decode_tok_s"], ref="a100")
    with pytest.raises(UserError, match="unknown metric 'tok_s'"):
        compare(got, ["tok_s"])


def test_two_commits_side_by_side_on_the_same_hardware(dataset):
    uri, rows = dataset
    got = select(uri, Selection(hosts=("h100",), commits=(fakerows.COMMITS[0][:8], fakerows.COMMITS[1][:8])))
    assert {r["host"] for r in got} == {"gpu-h100-a"}
    comp = compare(got, ["decode_tok_s", "e2e_ms"], by="commit")
    t = comp.tables[0]
    assert t.columns == [fakerows.COMMITS[0], fakerows.COMMITS[1]] and t.ref == fakerows.COMMITS[0]  # oldest first
    assert all(k[1] == hw_of(rows, "h100-a") for k in t.rows)
    for row in t.rows:
        assert t.cells[(row, fakerows.COMMITS[1])].ratio == pytest.approx(1 / 1.25, rel=0.1)  # 25% slower
        assert comp.tables[1].cells[(row, fakerows.COMMITS[1])].ratio == pytest.approx(1.25, rel=0.1)
    assert "@ h100-80gb-hbm3x1-" in t.labels[t.rows[0]]


def test_formats(dataset):
    uri, rows = dataset
    comp = compare(select(uri), ["decode_tok_s"])
    records = list(csv.DictReader(io.StringIO(to_csv(comp))))
    assert len(records) == 15 and {r["metric"] for r in records} == {"decode_tok_s"}
    assert {"config", "hardware_key", "median", "spread", "n", "ratio", "reference"} <= set(records[0])
    md = to_markdown(comp)
    assert "### decode_tok_s: decode throughput (tok/s, higher is better) · ratios to h100-" in md
    assert "| llama3.1-8b · gpu · b1 · p512→32 |" in md and "n=12" in md and "### Hardware" in md
    assert len(to_rich(comp)) == 1


def test_cli_compare(dataset):
    uri, rows = dataset
    runner = CliRunner()
    out = runner.invoke(cli.bench, ["compare", "--results", uri, "--format", "json", "--metric", "ttft_ms",
                                    "--ref", "l40s"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert {c["metric"] for c in doc["cells"]} == {"ttft_ms"} and len(doc["hardware"]) == 3
    assert all(c["reference"] == hw_of(rows, "l40s") for c in doc["cells"])
    out = runner.invoke(cli.bench, ["compare", "--results", uri, "--by", "commit", "--host", "gpu-h100-a",
                                    "--format", "markdown"])
    assert out.exit_code == 0 and "ratios to 1111111111" in out.output and "2222222222" in out.output
    out = runner.invoke(cli.bench, ["compare", "--results", uri, "--suite", "nightly", "--since", "2026-11-04"],
                        terminal_width=250)
    assert out.exit_code == 0 and "n=3" in out.output and "n=12" not in out.output
    out = runner.invoke(cli.bench, ["compare", "--results", uri, "--suite", "nope"])
    assert isinstance(out.exception, UserError) and "no successful runs match (suite=nope)" in str(out.exception)
    out = runner.invoke(cli.bench, ["compare", "--results", uri, "--metric", "all", "--format", "csv"])
    assert out.exit_code == 0 and "gpu_alloc_gb" in out.output


def test_selection_filters(dataset):
    uri, rows = dataset
    since = datetime(2026, 11, 3, tzinfo=timezone.utc)
    assert {r["date"] for r in select(uri, Selection(since=since))} == {"2026-11-03", "2026-11-04"}
    assert {r["host"] for r in select(uri, Selection(hosts=("h200", "gpu-l40s-a")))} == {"gpu-h200-a", "gpu-l40s-a"}
    assert select(uri, Selection(commits=("2222",)))[0]["git_commit"] == fakerows.COMMITS[1]
    assert select(uri, Selection(suites=("other",))) == []


def test_labels_without_config_json_fall_back_to_columns():
    row = fakerows.history(SUITE, ["h200"], 1)[0]
    old = {**row, "config_json": None}
    assert config_labels([old]) == {row["config_key"]: "llama3.1-8b · gpu · b1 · p512→32"}
    twin = {**old, "config_key": "other"}  # same visible fields, another key: the key prefix tells them apart
    labels = config_labels([old, twin])
    assert len(set(labels.values())) == 2 and labels["other"].endswith("[other]")
