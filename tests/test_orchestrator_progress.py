"""The live view's model and drawing (plain text: brackets in phases and errors are not markup)."""

from __future__ import annotations

from rich.console import Console

from orchestrator.cluster.progress import Progress, render_progress, render_rows


def draw(renderable) -> str:
    console = Console(width=120, record=True)
    console.print(renderable)
    return console.export_text()


def test_progress_counts_per_host_and_shows_each_running_phase():
    p = Progress(queued=5, names={"n1": "gpu-1", "n2": "gpu-2"})
    for run, host in (("a-r0", "gpu-1"), ("b-r0", "gpu-2"), ("c-r0", "gpu-1")):
        p.start(run, host, f"{host}/nvme0")
    p.phases["a-r0"] = "decode"
    p.finish("c-r0", "ok")
    p.start("d-r0", "gpu-2", "gpu-2/nvme1")
    p.finish("d-r0", "failed")
    p.retry("b-r0")
    assert (p.finished, p.n_failed, p.retries, p.load("n1"), p.load("n2")) == (2, 1, 1, 1, 0)
    text = draw(render_progress(p, "smoke · s-1"))
    assert "smoke · s-1  2/5 finished, 1 retried" in text
    assert "a-r0 @gpu-1/nvme0 [decode]" in text
    gpu1 = next(line for line in text.splitlines() if "gpu-1 " in line and "a-r0" in line)
    assert gpu1.split("│")[2].strip() == "1" and gpu1.split("│")[3].strip() == "0"


def test_result_rows_render_values_verbatim():
    text = draw(render_rows([{"run_id": "x-r0", "ttft_ms": 12.345, "error": "no host (hosts=['a'])", "status": None}],
                            columns=("run_id", "ttft_ms", "status", "error")))
    assert "x-r0" in text and "12.35" in text and "no host (hosts=['a'])" in text and " - " in text


def test_the_summary_fits_80_columns_with_whole_short_run_ids():
    """The submit summary of a suite was 13 columns with run ids folded over five lines at 80 columns."""
    import fakerows

    rows = fakerows.history(fakerows.suite(), ["h100-a"], nights=1)[:6]
    rows[0] = {**rows[0], "status": "failed", "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB "
                                                       "(GPU 0; 79.1 GiB total capacity; 77.9 GiB already allocated)"}
    console = Console(width=80, record=True)
    console.print(render_rows(rows, wide=False))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for r in rows:
        short = r["run_id"].split("-")[0][:6] + "-" + r["run_id"].split("-")[1]
        assert any(short in line for line in text.splitlines()), short  # never folded
    assert "CUDA out of" in text and "tok/s" in text and "attain" in text and "host gpu-h100-a" in text  # caption
    wide = Console(width=250, record=True)
    wide.print(render_rows(rows, wide=True))
    text = wide.export_text()
    assert rows[1]["run_id"] in text and "nvme_device" in text
