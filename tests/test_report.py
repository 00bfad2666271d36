"""`bench report`: a self-contained HTML file that renders offline, over data other readers see too."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from orchestrator.regress.check import Baseline
from orchestrator.regress.gate import Gate
from orchestrator.regress.history import HISTORY_METRICS, collect_history, history_flags, suite_run_starts
from orchestrator.regress.render import num
from orchestrator.regress.stats import summarize
from orchestrator.report import build
from orchestrator.report.build import build_report, latest_rows
from orchestrator.report.html import Column, table
from orchestrator.results.query import Selection, config_labels, hardware_info, select
from tests import fakerows

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    uri = str(root / "results")
    rows = fakerows.demo_dataset(uri)
    info = build_report(uri, root / "out" / "report.html", title="nightly <test>")
    return uri, rows, info, Path(info.path).read_text()


@pytest.fixture(scope="module")
def read_back(made):
    return select(made[0])


def test_report_is_self_contained(made):
    uri, rows, info, page = made
    assert info.rows == len(rows) and info.failed == 3 and info.suite_runs == 12 and info.exit_code == 1
    assert [p.name for p in Path(info.path).parent.iterdir()] == ["report.html"]  # no temp file left behind
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    images = re.findall(r'<img alt="?[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    images += re.findall(r"<img alt='[^']*' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) >= 6 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "<title>nightly &lt;test&gt;</title>" in page


def test_report_shows_the_sections_the_nightly_reader_needs(made):
    uri, rows, info, page = made
    for title in ("Regression check: nightly-", "Throughput and attainment", "Latency breakdown: TTFT, prefill, decode",
                  "I/O bandwidth against the host&#x27;s probe", "History over nights", "Failed runs (3)", "Hardware"):
        assert title in page, title
    assert "<div class=v>regression</div>" in page
    assert 'tr class="regression"' in page and "llama3.1-8b · gpu · b8 · p512→32" in page
    # errors are listed, escaped, newest first
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in page and "in &lt;module&gt; &amp; spill()" in page
    for hw in {r["hardware_key"] for r in rows}:
        assert hw in page
    assert "probe GB/s" in page and "6.80" in page  # the H100 box's SSD probe figure


def test_history_marks_the_night_of_the_regression(made, read_back):
    uri, rows, info, page = made
    got = read_back
    runs = list(suite_run_starts(got))
    flags = history_flags(got, runs, config_labels(got), Baseline(), Gate())
    gpu_b8 = fakerows.config_key(fakerows.suite(), "gpu", 8)
    h100 = next(r["hardware_key"] for r in rows if r["host"] == "gpu-h100-a")
    assert flags[(runs[-1], gpu_b8, h100, "decode_tok_s")] == "regression"
    # the gate judges each pair against its own noise with a 2% floor: on this noisy demo (3% per run,
    # 2% per night) a false night happens at about its nominal rate, not more
    pair_nights = {(r["suite_run_id"], r["config_key"], r["hardware_key"]) for r in got if r["status"] == "ok"}
    false = {(k[0], k[1], k[2]) for k, v in flags.items() if v == "regression"} - {(runs[-1], gpu_b8, h100)}
    assert len(false) <= 0.01 * len(pair_nights), false


def test_history_lines_are_suite_run_medians_marked_on_the_flagged_night(made, read_back):
    rows, got = made[1], read_back
    h = collect_history(got, config_labels(got), list(hardware_info(got)), Gate(), Baseline())
    runs = list(h.starts)
    first = {}
    for r in got:
        first[r["suite_run_id"]] = min(first.get(r["suite_run_id"], r["finished_at"]), r["finished_at"])
    assert runs == sorted(first, key=first.get) and list(h.starts.values()) == sorted(h.starts.values())
    gpu_b8 = fakerows.config_key(fakerows.suite(), "gpu", 8)
    h100 = next(r["hardware_key"] for r in rows if r["host"] == "gpu-h100-a")
    line = next(s for s in dict(h.panels["decode_tok_s"])[gpu_b8] if s.hardware == h100)
    assert [t for t, _ in line.points] == list(range(len(runs)))
    tonight = [r["decode_tok_s"] for r in got if (r["suite_run_id"], r["config_key"], r["hardware_key"], r["status"])
               == (runs[-1], gpu_b8, h100, "ok")]
    assert line.points[-1] == (len(runs) - 1, summarize(tonight).median)
    assert line.regressions == [line.points[-1]] and line.improvements == []
    marked = {(m, ck, s.hardware) for m, panels in h.panels.items() for ck, lines in panels for s in lines
              if s.regressions or s.improvements}
    assert marked == {(m, gpu_b8, h100) for m in HISTORY_METRICS}


def test_pandas_and_duckdb_read_the_dataset_the_report_was_made_from(made, read_back):
    pd = pytest.importorskip("pandas")
    duckdb = pytest.importorskip("duckdb")
    uri, rows, info, page = made
    df = pd.read_parquet(uri)
    assert len(df) == info.rows and (df["status"] == "failed").sum() == info.failed
    assert df["suite_run_id"].nunique() == info.suite_runs and set(df["schema_version"]) == {0, 1}
    con = duckdb.connect()
    files = f"read_parquet('{uri}/**/*.parquet', hive_partitioning = true, union_by_name = true)"
    n, failed = con.sql(f"select count(*), count(*) filter (where status = 'failed') from {files}").fetchall()[0]
    assert (n, failed) == (info.rows, info.failed)
    # the medians the report prints are the ones DuckDB computes from the same files
    latest = latest_rows(read_back)
    pair = next(r for r in latest if r["host"] == "gpu-h200-a")
    median = summarize([r["decode_tok_s"] for r in latest if (r["config_key"], r["hardware_key"]) ==
                        (pair["config_key"], pair["hardware_key"]) and r["status"] == "ok"]).median
    sql = (f"select median(decode_tok_s) from read_parquet('{uri}/**/*.parquet', hive_partitioning = true, "
           f"union_by_name = true) where suite_run_id = '{pair['suite_run_id']}' and config_key = "
           f"'{pair['config_key']}' and hardware_key = '{pair['hardware_key']}' and status = 'ok'")
    assert con.sql(sql).fetchall()[0][0] == pytest.approx(median)
    assert num(median) in page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (CI has none); docs/report.png is the committed render")
def test_report_renders_in_headless_chromium(made, tmp_path):
    from PIL import Image

    uri, rows, info, page = made
    shot = tmp_path / "shot.png"
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,2400",
                           Path(info.path).as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 2400)
    colors = image.resize((140, 240)).getcolors(maxcolors=100_000)
    assert colors is not None and len(colors) > 200  # text, tables and plots, not a blank or error page


def test_cli_report_follows_the_selection(tmp_path):
    uri = str(tmp_path / "results")
    s = fakerows.suite()
    rows = fakerows.history(s, ["h200", "l40s"], 3, seed=5, step={"night": 2, "host": "l40s", "slow": 2.0})
    fakerows.write(uri, rows)
    runner = CliRunner()
    out = runner.invoke(cli.bench, ["report", "--results", uri, "--out", str(tmp_path / "r.html"), "--host", "h200",
                                    "--suite", "nightly"], terminal_width=250)
    assert out.exit_code == 0, out.output
    # the L40S regressed that night, but the report is about the H200 (and 2 earlier nights are not enough)
    assert "r.html (45 runs, 0 failed, 3 suite runs; newest suite run: not enough data)" in out.output
    html = (tmp_path / "r.html").read_text()
    assert "gpu-h200-a" in html and "gpu-l40s-a" not in html and "host=h200" in html
    out = runner.invoke(cli.bench, ["report", "--results", str(tmp_path / "none"), "--out", str(tmp_path / "e.html")])
    assert out.exit_code == 0 and "(0 runs" in out.output
    assert "No runs match" in (tmp_path / "e.html").read_text()


def test_one_suite_run_has_no_history_yet(tmp_path):
    uri = str(tmp_path / "one")
    fakerows.write(uri, fakerows.history(fakerows.suite(), ["h200"], 1))
    info = build_report(uri, tmp_path / "one.html", Selection())
    page = Path(info.path).read_text()
    assert info.exit_code == 3 and "history starts with the second" in page and "not enough data" in page


XSS = "<script>alert(1)</script>"
XSS_TEXT = "&lt;script&gt;alert(1)&lt;/script&gt;"


def test_text_from_rows_reaches_the_page_as_text(tmp_path, monkeypatch):
    # hosts, errors, suite names, run ids and model names are whatever a row's writer put there
    s = fakerows.suite()
    rows = fakerows.history(s, ["h200"], 2, seed=3)
    last = rows[-1]["suite_run_id"]
    oom = fakerows.config_key(s, "mixed", 8)
    failed = fakerows.night(s, "h200", last, fakerows.START + timedelta(days=1, hours=1), np.random.default_rng(1),
                            fail={oom: f"boom {XSS}\n  at line 2"})
    rows += [r for r in failed if r["status"] != "ok"]
    rows = [{**r, "host": XSS, "suite": XSS, "suite_run_id": XSS + r["suite_run_id"], "model": XSS} for r in rows]
    monkeypatch.setattr(build, "select", lambda uri, sel: rows)
    page = Path(build_report("fake://results", tmp_path / "x.html", title=XSS).path).read_text()
    assert "<script" not in page
    assert f"<title>{XSS_TEXT}</title>" in page and f"<h2>Regression check: {XSS_TEXT}nightly-" in page
    assert f"<td class=t>{XSS_TEXT}</td>" in page  # the host of a failed run
    assert f"<td class=pre>boom {XSS_TEXT}\n  at line 2</td>" in page  # the error, its line break kept
    assert f"<td class=t>{XSS_TEXT} · gpu · b1 · p512→32</td>" in page  # a config label
    assert f"<pre>## bench regress · {XSS_TEXT} · {XSS_TEXT}nightly-" in page  # the markdown summary


def test_table_cells_align_by_content_and_column():
    got = table(["config", "tok/s", "ratio", Column("error", pre=True)],
                [["a · b1", "1,234.5", "×0.97", "line 1\nline <2>"], ["b", "—", "3 / 4", None]],
                row_class=lambda r: "failed" if r[3] else "")
    assert '<tr class="failed"><td class=t>a · b1</td><td>1,234.5</td><td>×0.97</td>' in got
    assert "<td class=pre>line 1\nline &lt;2&gt;</td></tr>" in got
    assert "<tr><td class=t>b</td><td>—</td><td>3 / 4</td><td class=pre></td></tr>" in got
    assert got.count("<th>") == 4 and "<th>error</th>" in got
    assert table(["a"], [], empty="None.") == "<p>None.</p>\n" and table(["a"], []) == ""


def test_templates_ship_with_the_package():
    # a non-editable install carries only the files package-data names
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["orchestrator"]
    templates = {p.relative_to(root / "orchestrator") for p in (root / "orchestrator/report/templates").iterdir()}
    shipped = {p.relative_to(root / "orchestrator") for g in globs for p in (root / "orchestrator").glob(g)}
    assert templates and templates <= shipped
