"""The one module that reads the environment.

The seed's scripts configure the engine through `WSM_*` variables; they keep working because this
module turns them into overrides of the typed config (flat leaf names of `worker.config`). The
precedence is: dataclass default < `WSM_*` variable < suite YAML / `bench run` flag. The seed's base
process settings (`OMP_NUM_THREADS=8`, `MALLOC_ARENA_MAX=2`) are applied to engine processes unless
the user set them. Everything else that reads a variable (Ray address, results location) goes
through a function here as well, and so does pointing torch's compile caches at the project's
cache directory (`use_compile_cache`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from worker.errors import UserError


def _bool(name: str, raw: str) -> bool:
    if raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if raw.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise UserError(f"environment variable {name}={raw!r} must be 0 or 1")


def _int(name: str, raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} must be an integer") from None


def _policy(name: str, raw: str) -> str:
    return "rolling" if _bool(name, raw) else "pinned-subset"


# WSM variable → (flat config field, parser). The seed's 16 switches, in the seed's order.
WSM_SWITCHES: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "WSM_CPU_ROLLING_MODE": ("cpu_policy", _policy),
    "WSM_CPU_RING_OFFSET": ("cpu_ring_offset", _int),
    "WSM_CPU_WRAP_AROUND": ("cpu_wrap_around", _bool),
    "WSM_CPU_ROLL_STRIDE": ("cpu_roll_stride", _int),
    "WSM_CPU_ROLL_SYNC": ("cpu_roll_sync", _bool),
    "WSM_AGGRESSIVE_GPU_PREFETCH": ("aggressive_gpu_prefetch", _int),
    "WSM_H2D_GROUP_BACKLOG_MAX": ("h2d_group_backlog_max", _int),
    "WSM_GPU_MAX_GROUPS": ("gpu_max_groups", _int),
    "WSM_SKIP_PRELOAD_WAIT": ("skip_preload_wait", _bool),
    "WSM_EVICT_FINISHED": ("evict_finished", _bool),
    "WSM_KV_THROTTLE_THRESHOLD": ("kv_throttle_threshold", _int),
    "WSM_KV_THROTTLE_MS": ("kv_throttle_ms", _int),
    "WSM_BALANCE_PREFETCH": ("balance_prefetch", _bool),
    "WSM_BALANCE_TOL": ("balance_tol", _int),
    "WSM_PAIR_AHEAD": ("pair_ahead", _int),
    "WSM_KIND_AHEAD_CAP": ("kind_ahead_cap", _int),
}

# The seed's base process settings: applied to engine processes when the user has not set them.
BASE_PROCESS_ENV = {"OMP_NUM_THREADS": "8", "MALLOC_ARENA_MAX": "2"}


def wsm_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Flat config overrides from the `WSM_*` variables that are set."""
    env = os.environ if environ is None else environ
    return {field: parse(name, env[name]) for name, (field, parse) in WSM_SWITCHES.items() if name in env}


def apply_base_process_env() -> dict[str, str]:
    """Set the seed's base variables where unset; return what was set (for the run record).

    OMP_NUM_THREADS only takes effect before torch starts its thread pool, so engine processes call
    this first; torch's intra-op threads are also set explicitly for the current process.
    """
    applied = {}
    for key, value in BASE_PROCESS_ENV.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


def omp_threads() -> int | None:
    raw = os.environ.get("OMP_NUM_THREADS")
    return int(raw) if raw and raw.isdigit() else None


def ray_address() -> str | None:
    """The cluster address when `--address` is not given (Ray's own convention)."""
    return os.environ.get("RAY_ADDRESS") or None


def results_uri() -> str | None:
    """Default results location when `--results` is not given."""
    return os.environ.get("STREAMBENCH_RESULTS") or None


def cache_dir() -> str:
    """Where per-host caches (probe figures) live."""
    return os.environ.get("STREAMBENCH_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "streambench")


def use_compile_cache(directory: str, torch_default: str | None = None) -> dict[str, Any]:
    """Point Inductor's and Triton's on-disk caches at `directory` (Triton's in its `triton/`), unless
    the user chose their own: a user's TORCHINDUCTOR_CACHE_DIR keeps Triton's under it too, as torch
    does by default. `torch_default` is the value torch puts in TORCHINDUCTOR_CACHE_DIR by itself on
    import, which is not a choice. Returns the directories in effect (`triton_dir` None: torch's,
    under the Inductor one) and which variables were the user's (see worker.model.compile_cache)."""
    inductor, triton = os.environ.get("TORCHINDUCTOR_CACHE_DIR"), os.environ.get("TRITON_CACHE_DIR")
    user = [k for k, v in (("TORCHINDUCTOR_CACHE_DIR", inductor if inductor != torch_default else None),
                           ("TRITON_CACHE_DIR", triton)) if v]
    if "TORCHINDUCTOR_CACHE_DIR" not in user:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
        if "TRITON_CACHE_DIR" not in user:
            os.environ["TRITON_CACHE_DIR"] = os.path.join(directory, "triton")
    return {"inductor_dir": os.environ["TORCHINDUCTOR_CACHE_DIR"], "triton_dir": os.environ.get("TRITON_CACHE_DIR"),
            "user_dirs": user}


def lock_dir() -> str:
    """Where the host-wide device locks live: one directory for every user and process on the host
    (see worker.host.devlock), so not under a per-user cache."""
    return os.environ.get("STREAMBENCH_LOCK_DIR") or "/tmp/streambench-locks"


def cuda_visible_devices() -> str | None:
    """CUDA_VISIBLE_DEVICES of this process (Ray sets it for an actor that holds GPUs); None where
    unset or empty, as on a CPU-only worker."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() or None


def bytecode_cache() -> bool:
    """STREAMBENCH_BYTECODE_CACHE (default on): keep torch's compiled bytecode under the cache
    directory where its install has none (worker.host.bytecode); 0 turns that off."""
    raw = os.environ.get("STREAMBENCH_BYTECODE_CACHE")
    return True if raw is None or not raw.strip() else _bool("STREAMBENCH_BYTECODE_CACHE", raw)


def compile_whole() -> bool:
    """STREAMBENCH_COMPILE_WHOLE (default on): keep whole compiled functions under the compile cache and
    load them in later processes instead of tracing again (worker.model.aot); 0 turns that off."""
    raw = os.environ.get("STREAMBENCH_COMPILE_WHOLE")
    return True if raw is None or not raw.strip() else _bool("STREAMBENCH_COMPILE_WHOLE", raw)


def export_pycache_prefix(prefix: str) -> None:
    """PYTHONPYCACHEPREFIX for this process's children (Inductor's compile workers import torch too)."""
    os.environ["PYTHONPYCACHEPREFIX"] = prefix


def snapshot(prefixes: tuple[str, ...] = ("WSM_", "OMP_", "MALLOC_", "CUDA_VISIBLE", "STREAMBENCH_")) -> dict[str, str]:
    """Relevant variables as set now, for the run record."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(prefixes)}


def engine_process_env() -> dict[str, str]:
    """Variables for Ray engine processes: the seed's base settings, the caller's own values winning.

    Ray sets OMP_NUM_THREADS in its workers before user code runs, so `apply_base_process_env` cannot
    see whether the user set it; the orchestrator passes these through the actor's runtime_env instead.
    """
    return {key: os.environ.get(key, value) for key, value in BASE_PROCESS_ENV.items()}


EMBEDDED_RAY_MARK = "STREAMBENCH_EMBEDDED_RAY"


def embedded_ray_owner() -> str | None:
    """The id every process of an embedded Ray carries in its environment (tests may choose it)."""
    return os.environ.get(EMBEDDED_RAY_MARK) or None


def prepare_embedded_ray(owner: str) -> dict[str, str]:
    """Set what the processes of an embedded local Ray inherit (see orchestrator.cluster.embedded):
    Ray's single-machine mode (every listener on 127.0.0.1), token authentication unless the user
    chose a mode, no usage reporting, and the owner mark, last (Ray renames its processes by
    overwriting the start of their environment block, the end survives). Returns what was set."""
    values = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    if "RAY_AUTH_MODE" not in os.environ:
        values["RAY_AUTH_MODE"] = "token"
    for key, value in values.items():
        os.environ[key] = value
    os.environ.pop(EMBEDDED_RAY_MARK, None)
    os.environ[EMBEDDED_RAY_MARK] = owner
    return {**values, EMBEDDED_RAY_MARK: owner}


def ray_auth_mode() -> str | None:
    """RAY_AUTH_MODE as set by the user (Ray's token authentication: "token" or "disabled")."""
    return os.environ.get("RAY_AUTH_MODE") or None
