"""`reuse: weights` (worker.host.reuse): a worker keeps its engine for the next run that would build the
same one, measures the same tokens with it, and rebuilds whenever anything that goes into the engine
changed (the config beyond measurement-only settings, the pack's files, the device, the prompt size)."""

from __future__ import annotations

import os
import time

import pytest

from orchestrator.cluster.actor import BenchWorker, RunOutcome
from orchestrator.results.schema import build_row
from orchestrator.suite.load import parse_suite
from worker.errors import UserError
from worker.host import devlock
from worker.host.reuse import MEASUREMENT_ONLY, EngineCache, engine_key
from worker.run import resolve_config, run


@pytest.fixture()
def flat(tiny_run):
    return tiny_run


class _Pack:
    def __init__(self, tmp_path):
        self.manifest_path, self.blob_path = tmp_path / "m.json", tmp_path / "b.blob"
        self.manifest_path.write_text("{}")
        self.blob_path.write_bytes(b"\0" * 4096)


def _key(flat, pack, **change):
    return engine_key(resolve_config({**flat, **change}), pack, "cpu", 8)


def test_measurement_only_settings_keep_the_key_and_the_rest_change_it(flat, tmp_path):
    pack = _Pack(tmp_path)
    base = _key(flat, pack)
    for change in ({"max_new_tokens": 9}, {"temperature": 0.7, "top_p": 0.5}, {"seed": 3}, {"warmup_rounds": 3},
                   {"prompt_len": 16}, {"roofline": False}, {"floor_window_s": 0.0}, {"out_json": "x.json"},
                   {"gc_freeze": True, "switch_interval_us": 200}):
        assert _key(flat, pack, **change) == base, change
    for change in ({"mode": "cpu"}, {"batch_size": 2}, {"max_seq_len": 128}, {"cpu_cache_layers": 2},
                   {"gpu_memory_limit_gb": 1.0}, {"kv_offload": "cpu"}, {"compile": False}, {"dtype": "float32"},
                   {"ssd_readers": 2}, {"staging_mb": 8}):
        assert _key(flat, pack, **change) != base, change
    assert engine_key(resolve_config(flat), pack, "cpu", 9) != base  # a longer prompt: a larger workspace
    assert engine_key(resolve_config(flat), pack, "cuda:0", 8) != base
    assert not MEASUREMENT_ONLY & {"mode", "batch_size", "max_seq_len", "compile", "dtype"}


def test_a_changed_pack_file_changes_the_key(flat, tmp_path):
    pack = _Pack(tmp_path)
    base = _key(flat, pack)
    time.sleep(0.01)
    pack.blob_path.write_bytes(b"\1" * 4096)  # re-packed in place: same path, new mtime
    assert _key(flat, pack) != base
    (tmp_path / "elsewhere").mkdir()
    assert _key(flat, _Pack(tmp_path / "elsewhere")) != _key(flat, pack)  # another pack, same contents


def test_a_reused_engine_measures_the_same_tokens_without_rebuilding(flat):
    fresh = run(resolve_config(flat))
    cache = EngineCache()
    try:
        first = run(resolve_config(flat), reuse=cache)
        second = run(resolve_config({**flat, "warmup_rounds": 2}), reuse=cache)  # measurement-only: same engine
    finally:
        cache.close()
    assert fresh["reuse"] == {"mode": "none", "reused_engine": False, "engine_key": None, "engine_runs": 1}
    assert first["reuse"]["reused_engine"] is False and second["reuse"]["reused_engine"] is True
    assert second["reuse"]["engine_runs"] == 2 and cache.built == 1
    tokens = [[o["token_ids"] for o in r["outputs"]] for r in (fresh, first, second)]
    assert tokens[0] == tokens[1] == tokens[2] and tokens[0][0]
    assert second["setup"]["slots_s"] == 0 and second["setup"]["fill_s"] == 0 and first["setup"]["slots_s"] > 0
    assert second["metrics"]["decode_steps"] == fresh["metrics"]["decode_steps"]
    # the counters restart for every measured round: the second run's SSD bytes are its own round's, its
    # passes over the SSD layer (prefill + decode steps) plus what the prefetch read ahead (timing: from
    # none to a pass or two), not the kept engine's total over both runs (three rounds and more). A ratio
    # to a fresh run's bytes ranged 0.55-1.0 over repeats, so the bound is in passes, not a ratio.
    from worker.pack.cache import ensure_pack
    from worker.pack.groups import KINDS, GroupKey

    manifest = ensure_pack(flat["checkpoints"], pack_dir=flat["pack_dir"]).manifest
    per_pass = sum(manifest.group(GroupKey(1, k).name).nbytes for k in KINDS)  # layer 1 is on the SSD
    passes = 1 + second["metrics"]["decode_steps"]
    read = second["io"]["ssd_read"]["bytes"]
    assert 0 < read <= (passes + 2) * per_pass, (read / per_pass, passes)


def test_a_different_engine_closes_the_kept_one_first(flat):
    cache = EngineCache()
    try:
        run(resolve_config(flat), reuse=cache)
        old = cache.kept.engine
        closed = []
        old.close = lambda: closed.append(True)
        r = run(resolve_config({**flat, "cpu_cache_layers": 2}), reuse=cache)
        assert closed == [True] and r["reuse"]["reused_engine"] is False and cache.built == 2
    finally:
        cache.close()
    assert cache.kept is None


def test_the_kept_engine_holds_its_device_locks_until_closed(flat, tmp_path):
    cache = EngineCache()
    try:
        run(resolve_config(flat), reuse=cache)
        keys = cache.kept.held.keys
        with pytest.raises(UserError, match="in use by another engine"):
            with devlock.hold(keys, 0.0):
                pass
    finally:
        cache.close()
    with devlock.hold(keys, 0.0):  # released with the engine
        pass


def test_a_failed_run_drops_the_kept_engine(flat, monkeypatch):
    cache = EngineCache()
    run(resolve_config(flat), reuse=cache)
    closed = []
    cache.kept.engine.close = lambda: closed.append(True)
    import worker.run as run_mod

    def boom(*a, **k):
        raise RuntimeError("engine bug")

    monkeypatch.setattr(run_mod, "_measure", boom)
    with pytest.raises(RuntimeError):
        run(resolve_config(flat), reuse=cache)
    assert closed == [True] and cache.kept is None


def test_the_tokenizer_is_loaded_again_only_when_its_files_change(tiny_ckpt, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    loads = []
    cache = EngineCache()
    load = lambda path: loads.append(path) or object()  # noqa: E731
    a = cache.tokenizer(str(ckpt), load)
    assert cache.tokenizer(str(ckpt), load) is a and len(loads) == 1
    os.utime(ckpt / "tokenizer.json", ns=(1, 1))
    assert cache.tokenizer(str(ckpt), load) is not a and len(loads) == 2


def _suite(reuse: str | None) -> str:
    line = f"reuse: {reuse}\n" if reuse else ""
    return f"name: t\n{line}models: [{{name: tiny, preset: tiny}}]\nrepeats: 2\nmatrix: {{mode: mixed}}\n"


def test_the_suite_asks_for_reuse_and_it_stays_out_of_the_keys():
    off, on = parse_suite(_suite(None)), parse_suite(_suite("weights"))
    assert [s.reuse for s in off.specs] == ["none", "none"] and [s.reuse for s in on.specs] == ["weights"] * 2
    assert [s.config_key for s in off.specs] == [s.config_key for s in on.specs]  # same work, comparable rows
    assert [s.run_id for s in off.specs] == [s.run_id for s in on.specs]
    with pytest.raises(UserError, match="reuse"):
        parse_suite(_suite("everything"))


def test_the_worker_keeps_a_cache_only_for_suites_that_ask(tmp_path):
    seen = []

    def fake_run(cfg, on_phase, **kw):
        seen.append(kw.get("reuse"))
        return {"ok": True}

    w = BenchWorker(run_fn=fake_run)
    on, off = parse_suite(_suite("weights")).specs[0], parse_suite(_suite(None)).specs[0]
    for spec in (on, on, off):
        w.run(spec)
    assert seen[0] is not None and seen[1] is seen[0] and seen[2] is None and w.reuse is None


def test_the_row_says_whether_the_engine_was_reused():
    spec = parse_suite(_suite("weights")).specs[0]
    row = build_row(spec, "t-1", RunOutcome("ok", None, {"reuse": {"reused_engine": True}}, None, None, 0.0, 1.0))
    assert row["reused_engine"] is True
    old = build_row(spec, "t-1", RunOutcome("ok", None, {}, None, None, 0.0, 1.0))
    assert old["reused_engine"] is None


def test_a_kept_tokenizer_makes_its_word_pool_once(tiny_ckpt, monkeypatch, tmp_path):
    from worker.text import prompts
    from worker.text.checkpoint import load_tokenizer

    monkeypatch.setenv("STREAMBENCH_CACHE", str(tmp_path / "cache"))  # no entry on disk from another test
    tok = load_tokenizer(str(tiny_ckpt))
    made = []
    real = prompts._word_pool
    monkeypatch.setattr(prompts, "_word_pool", lambda t: made.append(t) or real(t))
    a = prompts.synth_prompts(tok, 2, 12, seed=1)
    b = prompts.synth_prompts(tok, 2, 12, seed=1)
    assert a == b and len(made) == 1
    # another tokenizer object of the same files: its pool from the disk entry (worker.text.poolcache)
    prompts.synth_prompts(load_tokenizer(str(tiny_ckpt)), 1, 12, seed=1)
    assert len(made) == 1
