"""Benchmark suites: a YAML document, validated whole before anything runs, expanded into RunSpecs.

A suite names its models (a checkpoint path on the worker hosts, or a synthetic `make-model` preset
materialised on each host), default run settings, and a matrix: a mapping of keys to lists whose
cross product is the plan (or a list of such mappings, concatenated). Matrix keys are the run
config's flat leaf names (`mode`, `batch_size`, `prompt_len`, `prefetch_distance`, ...), plus `model`
(names from `models:`; default all) and `host` (selectors, see orchestrator.selector). Every point is
resolved into a full RunConfig here, so a typo or an out-of-range value fails before submission with
the file, the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from orchestrator.regress.metrics import check_thresholds
from orchestrator.suite.selector import Selector
from orchestrator.suite.spec import ModelSpec, RunSpec, stable_hash
from worker import envs
from worker.config import RunConfig, flat_owners
from worker.errors import UserError, one_line

DEFAULT_SUITE = "smoke"
# Set by the orchestrator per host and run, never by a suite.
RESERVED_KEYS = {"checkpoints": "name the model under `models:` instead",
                 "out_json": "results go to the Parquet dataset (`--results`)"}
# Host-local paths, log switches and how the floor is measured: not part of what makes two runs comparable.
NOT_IN_CONFIG_KEY = ("checkpoints", "out_json", "verbose", "pack_dir", "manifest", "raw_device", "device_wait_s",
                     "pack_verify_days", "floor_window_s")
MATRIX_EXTRA_KEYS = ("model", "host")


@functools.cache
def _defaults() -> dict[str, Any]:
    return RunConfig.from_flat({"checkpoints": "<model>", "out_json": None}).to_flat()


def keyed_config(flat: dict[str, Any]) -> dict[str, Any]:
    """What a config key hashes: the settings that differ from RunConfig's defaults (host-local ones aside).

    Not the whole resolved config: a commit that adds a setting (with a default that keeps today's
    behaviour) would then give every config a new key, and the gate would find no history for any of
    them that night. A commit that changes a default keeps the keys, so the gate compares across it
    and flags what it changed, as it should: the row's config_json holds the full resolved config."""
    defaults = _defaults()
    return {k: v for k, v in flat.items() if k not in NOT_IN_CONFIG_KEY and (k not in defaults or defaults[k] != v)}


class SuiteDoc(BaseModel):
    """The YAML document."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    models: list[ModelSpec] = Field(min_length=1)
    repeats: int = Field(default=1, ge=1)
    retries: int = Field(default=2, ge=0, description="Extra attempts after an actor or node died.")
    timeout_s: float = Field(default=3600.0, gt=0, description="Longest one run may take.")
    on_no_host: Literal["fail", "skip"] = "fail"
    reuse: Literal["none", "weights"] = Field(default="none", description=(
        "`weights`: a worker keeps its engine (loaded tiers, compiled model) for the next run that would "
        "build the same one; see worker.host.reuse for what must match and why the measurement is unaffected."))
    defaults: dict[str, Any] = Field(default_factory=dict)
    matrix: dict[str, Any] | list[dict[str, Any]] = Field(default_factory=dict)
    thresholds: dict[str, float | None] = Field(default_factory=dict, description=(
        "`bench regress`: relative change per metric that counts as a regression (0.2 = 20%; null = not "
        "checked); see orchestrator.metrics for the metrics and their defaults."))

    @field_validator("thresholds")
    @classmethod
    def _known_metrics(cls, value: dict[str, float | None]) -> dict[str, float | None]:
        return check_thresholds(value)


@dataclass(frozen=True)
class Suite:
    name: str
    source: str
    doc: SuiteDoc
    specs: list[RunSpec]


def embedded_suites() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("configs").iterdir() if p.name.endswith(".yaml"))


def load_suite(ref: str | None = None) -> Suite:
    """Load and expand a suite: a YAML path, or the name of an embedded one (default: smoke)."""
    ref = ref or DEFAULT_SUITE
    path = Path(ref)
    if path.is_file():
        return parse_suite(path.read_text(), source=str(path))
    if ref in embedded_suites():
        text = resources.files("configs").joinpath(f"{ref}.yaml").read_text()
        return parse_suite(text, source=f"configs/{ref}.yaml")
    raise UserError(f"suite {ref!r} is neither a file nor an embedded suite ({', '.join(embedded_suites())})")


def yaml_mapping(text: str, source: str) -> dict:
    """A suite document's raw mapping, or a one-line error naming the file."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a suite is a YAML mapping with keys {', '.join(SuiteDoc.model_fields)}")
    return raw


def parse_suite(text: str, source: str = "suite.yaml") -> Suite:
    raw = yaml_mapping(text, source)
    try:
        doc = SuiteDoc.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{source}: {one_line(e, allowed=_allowed(SuiteDoc))}") from None
    return Suite(doc.name, source, doc, expand(doc, source))


def expand(doc: SuiteDoc, source: str) -> list[RunSpec]:
    """The plan: every matrix point × model × repeat, each resolved and validated."""
    models = {m.name: m for m in doc.models}
    if len(models) != len(doc.models):
        raise UserError(f"{source}: models: names must be unique")
    blocks = doc.matrix if isinstance(doc.matrix, list) else [doc.matrix]
    if not blocks:
        raise UserError(f"{source}: matrix: an empty list plans no runs; give at least one point (a mapping of keys to "
                        "values), or leave `matrix` out for one run per model")
    base = RunConfig.from_flat(envs.wsm_overrides(), where="WSM_* environment")
    _check_keys(doc.defaults, f"{source}: defaults", allow_model=False)
    specs: list[RunSpec] = []
    seen: dict[str, str] = {}
    for b, block in enumerate(blocks):
        where = f"{source}: matrix" + (f"[{b}]" if isinstance(doc.matrix, list) else "")
        _check_keys(block, where, allow_model=True)
        axes = {k: (v if isinstance(v, list) else [v]) for k, v in block.items()}
        axes.setdefault("model", list(models))
        for key, values in axes.items():
            if not values:
                raise UserError(f"{where}.{key}: empty list; give at least one value")
        for point in itertools.product(*axes.values()):
            given = dict(zip(axes, point))
            label = f"{where} point {({k: v for k, v in given.items() if k in block})}"
            values = {**doc.defaults, **given}
            model = _model(models, values.pop("model"), where)
            selector = _selector(values.pop("host", None), f"{where}.host")
            cfg = RunConfig.from_flat({**values, "checkpoints": "<model>", "out_json": None}, base=base, where=label)
            flat = {k: v for k, v in cfg.to_flat().items() if k not in RESERVED_KEYS}
            key_doc = {"config": keyed_config(flat), "model": model.identity()}
            config_key = stable_hash(key_doc)
            spec_hash = stable_hash({**key_doc, "host": selector.to_dict()})
            if spec_hash in seen:
                raise UserError(f"{label} repeats {seen[spec_hash]}; use `repeats:` for repetitions")
            seen[spec_hash] = label
            for r in range(doc.repeats):
                specs.append(RunSpec(doc.name, f"{spec_hash[:12]}-r{r}", spec_hash, config_key, r, model, selector,
                                     flat, doc.timeout_s, doc.reuse))
    return specs


def _check_keys(values: dict[str, Any], where: str, allow_model: bool) -> None:
    allowed = set(flat_owners()) - set(RESERVED_KEYS)
    extra = set(MATRIX_EXTRA_KEYS) if allow_model else {"host"}
    for key in values:
        if key in RESERVED_KEYS:
            raise UserError(f"{where}.{key}: not allowed in a suite; {RESERVED_KEYS[key]}")
        if key not in allowed | extra:
            raise UserError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(sorted(allowed | extra))}")


def _model(models: dict[str, ModelSpec], name: Any, where: str) -> ModelSpec:
    if name not in models:
        raise UserError(f"{where}.model: unknown model {name!r}; models of this suite: {', '.join(models)}")
    return models[name]


def _selector(raw: Any, where: str) -> Selector:
    if raw is None:
        return Selector()
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a selector is a mapping with keys "
                        f"{', '.join(f.name for f in dataclasses.fields(Selector))} (got {raw!r})")
    try:
        return TypeAdapter(Selector).validate_python(raw)
    except ValidationError as e:
        raise UserError(f"{where}: {one_line(e, allowed=_allowed(Selector))}") from None


def _allowed(model: Any):
    """The keys allowed where an unknown one was found (for `one_line`)."""
    def keys(loc: tuple) -> list[str]:
        if loc[:1] == ("models",):
            return [f.name for f in dataclasses.fields(ModelSpec)]
        if dataclasses.is_dataclass(model):
            return [f.name for f in dataclasses.fields(model)]
        return list(model.model_fields)
    return keys
