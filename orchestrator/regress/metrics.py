"""The metrics that comparison, regression and the report know: which way is better, declared once.

Every numeric result column a user may compare is listed here with its direction and unit. The
regression gate checks the metrics that have a default practical floor: a change counts only when
it is beyond the noise the history shows (orchestrator.regress.stats) and beyond this floor, 2% by
default — small enough for an engine whose repeats agree to a fraction of a percent, large enough
that a statistically real but immaterial change (0.5% of attainment) does not fail a night. A suite
(`thresholds:`), a thresholds file or `--threshold` replaces the floor per metric (the fixed 15–20%
thresholds of the first release are such overrides now). Tail latency (p99 of a few dozen decode
steps is one step), I/O bandwidth (its effect shows in throughput and attainment) and memory are
off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from worker.errors import UserError

Better = Literal["higher", "lower"]
FLOOR = 0.02  # the default practical floor: see the module docstring


@dataclass(frozen=True)
class Metric:
    """A result column with its direction: `better` says which way is an improvement."""

    name: str
    label: str
    unit: str
    better: Better
    threshold: float | None  # default practical floor: the least relative change that counts; None = not checked

    @property
    def sign(self) -> int:
        """+1 when a rise is worse (latency), -1 when a fall is worse (throughput)."""
        return 1 if self.better == "lower" else -1

    def describe(self) -> str:
        unit = f"{self.unit}, " if self.unit else ""
        return f"{self.label} ({unit}{self.better} is better)"


def _m(name: str, label: str, unit: str, better: Better, threshold: float | None = None) -> Metric:
    return Metric(name, label, unit, better, threshold)


METRICS: dict[str, Metric] = {m.name: m for m in (
    _m("decode_tok_s", "decode throughput", "tok/s", "higher", FLOOR),
    _m("attainment_decode", "decode attainment of the I/O floor", "", "higher", FLOOR),
    _m("attainment_prefill", "prefill attainment of the I/O floor", "", "higher"),
    _m("ttft_ms", "time to first token", "ms", "lower", FLOOR),
    _m("prefill_ms", "prefill", "ms", "lower", FLOOR),
    _m("decode_ms", "decode", "ms", "lower", FLOOR),
    _m("e2e_ms", "end to end", "ms", "lower", FLOOR),
    _m("itl_p50_ms", "inter-token latency p50", "ms", "lower", FLOOR),
    _m("itl_p90_ms", "inter-token latency p90", "ms", "lower"),
    _m("itl_p99_ms", "inter-token latency p99", "ms", "lower"),
    _m("ssd_read_gbps", "SSD read bandwidth", "GB/s", "higher"),
    _m("weight_h2d_gbps", "weight H2D bandwidth", "GB/s", "higher"),
    _m("kv_h2d_gbps", "KV H2D bandwidth", "GB/s", "higher"),
    _m("kv_d2h_gbps", "KV D2H bandwidth", "GB/s", "higher"),
    _m("gpu_alloc_gb", "GPU memory allocated (max)", "GB", "lower"),
    _m("gpu_reserved_gb", "GPU memory reserved (max)", "GB", "lower"),
    _m("host_rss_gb", "host RSS", "GB", "lower"),
    _m("pinned_host_gb", "pinned host memory", "GB", "lower"),
)}

DEFAULT_COMPARE = ("decode_tok_s", "ttft_ms", "e2e_ms", "attainment_decode")
# I/O channels with the probe figure each is bounded by (KV D2H has no probe of its own: H2D is the
# PCIe figure closest to it).
CHANNELS: tuple[tuple[str, str], ...] = (("ssd_read_gbps", "probe_ssd_gbps"), ("weight_h2d_gbps", "probe_h2d_gbps"),
                                         ("kv_h2d_gbps", "probe_h2d_gbps"), ("kv_d2h_gbps", "probe_h2d_gbps"))


def metric(name: str) -> Metric:
    """The metric called `name`, or a UserError listing the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise UserError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}") from None


def default_thresholds() -> dict[str, float]:
    return {m.name: m.threshold for m in METRICS.values() if m.threshold is not None}


def check_thresholds(values: dict[str, float | None]) -> dict[str, float | None]:
    """Validate a `metric: fraction | null` mapping (a suite's `thresholds:` or a thresholds file's).

    Raises ValueError naming the metric: unknown names, negative values, or a fall of 100% or more
    for a higher-is-better metric (it can never happen, so the gate would be off by accident).
    """
    for name, value in values.items():
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}: a threshold is a fraction of the baseline (0.2 = 20%) or null, got {value!r}")
        if METRICS[name].better == "higher" and value >= 1:
            raise ValueError(f"{name}: higher is better, so a threshold must be below 1 (0.2 = a 20% fall), "
                             f"got {value!r}")
    return values
