"""Suites: validation before anything runs (errors name file, key, allowed values) and matrix expansion."""

from __future__ import annotations

import pytest

from orchestrator.suite.load import embedded_suites, load_suite, parse_suite
from worker.config import RunConfig
from worker.errors import UserError

BASE = "name: t\nmodels: [{name: tiny, preset: tiny}]\n"


def test_matrix_is_a_cross_product_with_repeats_and_stable_ids():
    doc = BASE + "repeats: 2\ndefaults: {max_new_tokens: 4}\nmatrix:\n  mode: [gpu, ssd]\n  batch_size: [1, 2, 4]\n"
    specs = parse_suite(doc).specs
    assert len(specs) == 2 * 3 * 2
    assert {(s.flat["mode"], s.flat["batch_size"]) for s in specs} == {(m, b) for m in ("gpu", "ssd") for b in (1, 2, 4)}
    assert all(s.flat["max_new_tokens"] == 4 for s in specs)
    assert len({s.run_id for s in specs}) == len(specs)
    assert [s.repeat for s in specs[:2]] == [0, 1] and specs[0].spec_hash == specs[1].spec_hash
    # the same document expands to the same ids (resubmission relies on it)
    assert [s.run_id for s in parse_suite(doc).specs] == [s.run_id for s in specs]


def test_config_key_ignores_host_selector_and_spec_hash_does_not():
    doc = BASE + "matrix:\n  host: [{gpu: H100}, {gpu: H200}]\n"
    a, b = parse_suite(doc).specs
    assert a.config_key == b.config_key and a.spec_hash != b.spec_hash
    assert a.selector.gpu == "H100" and b.selector.describe() == "gpu=H200"


def test_resolved_config_is_complete_and_changes_the_key():
    one = parse_suite(BASE + "matrix: {prefetch_distance: 3}\n").specs[0]
    two = parse_suite(BASE + "matrix: {prefetch_distance: 4}\n").specs[0]
    assert set(one.flat) == set(RunConfig().to_flat()) - {"checkpoints", "out_json"}
    assert one.config_key != two.config_key
    cfg = one.config("/ckpt")
    assert cfg.checkpoints == "/ckpt" and cfg.out_json is None and cfg.stream.prefetch_distance == 3


def test_config_key_hashes_only_settings_that_differ_from_the_defaults():
    """A commit that adds a setting must not re-key every config (the gate would find no history that
    night), and a point that spells out a default is the same config as one that leaves it out."""
    from orchestrator.suite.load import keyed_config
    from orchestrator.suite.spec import stable_hash

    one = parse_suite(BASE + "matrix: {mode: cpu, prefetch_distance: 3}\n").specs[0]
    plain = parse_suite(BASE + "matrix: {mode: cpu}\n").specs[0]
    spelled = parse_suite(BASE + f"matrix: {{mode: cpu, topk_key_bits: {RunConfig().kv.topk_key_bits}}}\n").specs[0]
    assert keyed_config(one.flat) == {"mode": "cpu", "prefetch_distance": 3}
    assert one.config_key == stable_hash({"config": {"mode": "cpu", "prefetch_distance": 3},
                                          "model": one.model.identity()})
    assert plain.config_key == spelled.config_key != one.config_key


def test_matrix_list_blocks_and_model_axis():
    doc = ("name: t\nmodels: [{name: a, preset: tiny}, {name: b, preset: tiny, layers: 2}]\n"
           "matrix:\n  - {model: a, mode: [gpu, cpu]}\n  - {mode: mixed, gpu_cached_layers: 1, cpu_cache_layers: 1}\n")
    specs = parse_suite(doc).specs
    assert [(s.model.name, s.flat["mode"]) for s in specs] == [("a", "gpu"), ("a", "cpu"), ("a", "mixed"),
                                                               ("b", "mixed")]
    assert specs[3].model.layers == 2


def test_prompt_len_maps_to_run_config():
    (spec,) = parse_suite(BASE + "matrix: {prompt_len: 100, max_seq_len: 256, max_new_tokens: 16}\n").specs
    assert spec.config("/c").prompt_len == 100


def test_wsm_environment_is_the_base_and_the_suite_wins(monkeypatch):
    monkeypatch.setenv("WSM_GPU_MAX_GROUPS", "7")
    monkeypatch.setenv("WSM_BALANCE_TOL", "3")
    (spec,) = parse_suite(BASE + "defaults: {balance_tol: 2}\n").specs
    assert spec.flat["gpu_max_groups"] == 7 and spec.flat["balance_tol"] == 2


@pytest.mark.parametrize("body, expected", [
    ("matrix:\n  mode: [gpu, turbo]\n", "t.yaml: matrix point {'mode': 'turbo'}: mode: Input should be 'gpu', 'cpu', 'ssd' or 'mixed'"),
    ("matrix:\n  prefetch_dist: [1]\n", "t.yaml: matrix: unknown key 'prefetch_dist'; allowed keys: "),
    ("matrix:\n  - {batch_size: [1]}\n  - {batch_size: 0}\n", "t.yaml: matrix[1] point {'batch_size': 0}: batch_size must be >= 1"),
    ("defaults: {checkpoints: /x}\n", "t.yaml: defaults.checkpoints: not allowed in a suite; name the model under"),
    ("matrix: {host: [{gpus: H100}]}\n", "t.yaml: matrix.host: unknown key 'gpus'; allowed keys here: hosts, gpu, nvme, "
                                          "resources, labels"),
    ("matrix: {model: [huge]}\n", "t.yaml: matrix.model: unknown model 'huge'; models of this suite: tiny"),
    ("matrix: {mode: []}\n", "t.yaml: matrix.mode: empty list"),
    ("repeats: 0\n", "t.yaml: repeats must be >= 1 (got 0)"),
    ("on_no_host: ignore\n", "t.yaml: on_no_host: Input should be 'fail' or 'skip'"),
    ("matrix:\n  - {mode: gpu}\n  - {mode: gpu}\n", "repeats t.yaml: matrix[0] point {'mode': 'gpu'}; use `repeats:`"),
    ("matrix: {max_new_tokens: 4000}\n", "max_new_tokens must be < max_seq_len (2048)"),
])
def test_invalid_suites_name_the_key(body, expected):
    with pytest.raises(UserError) as e:
        parse_suite(BASE + body, source="t.yaml")
    assert expected in str(e.value)


@pytest.mark.parametrize("doc, expected", [
    ("name: t\nmodel: [{name: a, preset: tiny}]\n", "unknown key 'model'; allowed keys here: name, description, models"),
    ("name: t\nmodels: [{name: a, preset: tinyy}]\n", "models.0: unknown preset 'tinyy'; allowed: tiny, llama3.1-8b"),
    ("name: t\nmodels: [{name: a, preset: tiny, layer: 2}]\n", "unknown key 'models.0.layer'; allowed keys here: name, path, preset"),
    ("name: t\nmodels: [{name: a, path: /x, preset: tiny}]\n", "give exactly one of `path`"),
    ("name: t t\nmodels: [{name: a, preset: tiny}]\n", "name: String should match pattern"),
    ("- just a list\n", "a suite is a YAML mapping"),
    ("name: [unclosed\n", "not valid YAML"),
])
def test_invalid_documents_name_the_key(doc, expected):
    with pytest.raises(UserError, match="^t.yaml: ") as e:
        parse_suite(doc, source="t.yaml")
    assert expected in str(e.value)


def test_embedded_suites_validate_and_smoke_is_the_default():
    assert {"smoke", "llama3.1-70b-mixed", "nightly"} <= set(embedded_suites())
    smoke = load_suite(None)
    assert smoke.name == "smoke" and smoke.source == "configs/smoke.yaml"
    assert {s.flat["mode"] for s in smoke.specs} == {"gpu", "cpu", "ssd", "mixed"}
    assert all(s.model.preset == "tiny" and s.selector.to_dict() == {} for s in smoke.specs)
    nightly = load_suite("nightly")
    assert nightly.doc.on_no_host == "skip" and len({s.selector.gpu for s in nightly.specs}) >= 3


def test_seed_run_has_the_seed_values():
    (spec,) = load_suite("llama3.1-70b-mixed").specs
    f = spec.flat
    assert spec.model.preset == "llama3.1-70b" and spec.selector.gpu == "any"
    assert (f["mode"], f["batch_size"], f["max_new_tokens"], f["max_seq_len"]) == ("mixed", 1, 32, 2048)
    assert (f["prefetch_distance"], f["group_prefetch_depth"], f["gpu_cached_layers"], f["cpu_cache_layers"]) == (6, 4, 4, 40)
    assert (f["warmup_layers"], f["staging_mb"], f["topk_blk"]) == (4, 64, 8)
    wsm = {"cpu_policy": "rolling", "cpu_ring_offset": 0, "cpu_wrap_around": True, "cpu_roll_stride": 1,
           "cpu_roll_sync": True, "aggressive_gpu_prefetch": 2, "h2d_group_backlog_max": 1, "gpu_max_groups": 10,
           "skip_preload_wait": True, "evict_finished": True, "kv_throttle_threshold": 8, "kv_throttle_ms": 16,
           "balance_prefetch": True, "balance_tol": 1, "pair_ahead": 2, "kind_ahead_cap": 2}
    assert {k: f[k] for k in wsm} == wsm


def test_unknown_suite_reference():
    with pytest.raises(UserError, match="neither a file nor an embedded suite"):
        load_suite("no-such-suite")


def test_suite_file_is_loaded_from_a_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(BASE + "matrix: {mode: cpu}\n")
    suite = load_suite(str(path))
    assert suite.source == str(path) and suite.specs[0].flat["mode"] == "cpu"
