"""The regression gate's settings: per-metric practical floors and the noise test's parameters.

A change is a regression when it is beyond the noise the pair's history shows (calibrated, see
orchestrator.regress.stats) AND beyond the metric's practical floor, in its worse direction. The
floors layer, later wins: the metric table's defaults (2%, orchestrator.regress.metrics), the
suite's `thresholds:` block, a thresholds file (`--thresholds FILE`), then `--threshold
METRIC=VALUE` flags. A value is the least relative change that counts (0.02 = 2%); null or `off`
stops checking a metric, and naming a metric that is off by default turns it on.

A thresholds file (see configs/thresholds/default.yaml):

    z: 3.0                    # nominal z: a 0.13% false-alarm rate per comparison (orchestrator.stats)
    min_baseline_runs: 5      # fewer earlier suite runs than this: not enough data
    min_baseline_values: 3    # explicit baseline (one run or commit): fewer repeats than this: not enough
    noise_floor: 0.0005       # the standard error is at least this fraction of the baseline level
    thresholds: {decode_tok_s: 0.15, itl_p99_ms: 0.3, e2e_ms: null}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.regress.metrics import check_thresholds, default_thresholds, metric
from worker.errors import UserError, one_line


@dataclass(frozen=True)
class Gate:
    """What counts as a regression: beyond `thresholds[metric]` AND beyond `z` robust σ of the noise."""

    thresholds: dict[str, float] = field(default_factory=default_thresholds)
    z: float = 3.0
    min_runs: int = 5
    min_values: int = 3
    noise_floor: float = 0.0005
    sources: tuple[str, ...] = ("defaults",)

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds, "z": self.z, "min_baseline_runs": self.min_runs,
                "min_baseline_values": self.min_values, "noise_floor": self.noise_floor, "sources": list(self.sources)}


class ThresholdsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    z: float | None = Field(default=None, gt=0)
    min_baseline_runs: int | None = Field(default=None, ge=2)
    min_baseline_values: int | None = Field(default=None, ge=1)
    noise_floor: float | None = Field(default=None, ge=0, lt=1)
    thresholds: dict[str, float | None] = Field(default_factory=dict)

    @field_validator("thresholds")
    @classmethod
    def _known(cls, value: dict[str, float | None]) -> dict[str, float | None]:
        return check_thresholds(value)


def load_file(path: str | Path) -> ThresholdsFile:
    """Parse and validate a thresholds file; errors name the file and the key."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--thresholds {path}: no such file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
        return ThresholdsFile.model_validate(raw)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except ValidationError as e:
        raise UserError(f"{path}: {one_line(e, allowed=lambda loc: ThresholdsFile.model_fields)}") from None


def parse_override(text: str) -> tuple[str, float | None]:
    """`METRIC=VALUE` (VALUE a fraction, `20%`, or `off`) from the command line."""
    name, sep, value = text.partition("=")
    if not sep:
        raise UserError(f"--threshold {text!r}: write METRIC=FRACTION (e.g. decode_tok_s=0.1) or METRIC=off")
    metric(name.strip())
    value = value.strip().lower()
    if value in ("off", "none", "null"):
        return name.strip(), None
    try:
        number = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise UserError(f"--threshold {text!r}: {value!r} is not a number, a percentage or `off`") from None
    try:
        check_thresholds({name.strip(): number})
    except ValueError as e:
        raise UserError(f"--threshold {text!r}: {e}") from None
    return name.strip(), number


def resolve_gate(suite_thresholds: dict[str, float | None] | None = None, file: str | Path | None = None,
                 overrides: dict[str, float | None] | None = None, z: float | None = None) -> Gate:
    """Layer the defaults, the suite's thresholds, a thresholds file and command-line values."""
    merged: dict[str, float | None] = dict(default_thresholds())
    sources = ["defaults"]
    settings: dict[str, Any] = {}
    if suite_thresholds:
        merged.update(suite_thresholds)
        sources.append("suite")
    if file is not None:
        doc = load_file(file)
        merged.update(doc.thresholds)
        settings = {k: v for k, v in (("z", doc.z), ("min_runs", doc.min_baseline_runs),
                                      ("min_values", doc.min_baseline_values), ("noise_floor", doc.noise_floor))
                    if v is not None}
        sources.append(str(file))
    if overrides:
        merged.update(overrides)
        sources.append("command line")
    if z is not None:
        if z <= 0:
            raise UserError(f"--z {z}: the z-score threshold must be positive (3 is the default)")
        settings["z"] = z
    return Gate(thresholds={k: float(v) for k, v in merged.items() if v is not None}, sources=tuple(sources),
                **settings)


def suite_thresholds(ref: str | None) -> tuple[str | None, dict[str, float | None] | None]:
    """(suite name, its `thresholds:`) for a suite reference: a YAML file or an embedded suite's name,
    or just the name of a suite in the dataset (no thresholds). Only the name and the thresholds are
    read and checked: the rest of the suite is `bench submit`'s business, and validating it would
    import the engine (torch) for nothing."""
    if ref is None:
        return None, None
    from importlib import resources

    from orchestrator.suite.load import embedded_suites, yaml_mapping

    path = Path(ref)
    if path.is_file():
        text, source = path.read_text(), str(path)
    elif ref in embedded_suites():
        text, source = resources.files("configs").joinpath(f"{ref}.yaml").read_text(), f"configs/{ref}.yaml"
    else:
        return ref, None
    raw = yaml_mapping(text, source)
    try:
        thresholds = check_thresholds(dict(raw.get("thresholds") or {}))
    except ValueError as e:
        raise UserError(f"{source}: thresholds: {e}") from None
    return str(raw.get("name") or ref), thresholds
