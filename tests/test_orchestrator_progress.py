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
