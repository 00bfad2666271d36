"""The peer engine: the same run on HF transformers + accelerate offload, for side-by-side rows.

`bench run --engine accelerate` loads the checkpoint with `AutoModelForCausalLM.from_pretrained` and
an accelerate device map built from the run's budgets, then measures it with exactly the streaming
engine's loop: `worker.generate.generate` drives the HF model through `HFForward`, an adapter with
the engine's `forward(tokens, step, cache, logits_at)`, and `worker.generate.measure` runs the rounds.
So prompts (`worker.text.prompts`), sampling, the stopping rule and the timing (TTFT, prefill, decode,
per-token CUDA events, warm-up excluded) are the same code, and the difference between two rows is the
engine alone. One difference is kept: a peer warm-up round generates the full max_new_tokens (the
engine's generate `WARMUP_TOKENS`), as peer rows always have, so that older peer rows stay comparable.

Batches are right-padded as in the engine. HF supports this directly: its DynamicCache is slot-based
(the causal mask is over cache slots, `position_ids` only feed RoPE), so every row gets its own
positions and a 2-D attention mask hides the pad slots; rows compute what they compute alone.

Placement per mode (`plan_placement`): `gpu` everything on the GPU; `cpu` and `ssd` let accelerate
place modules within the budgets (GPU budget = `gpu_memory_limit_gb`, else 90% of the free card;
CPU unlimited for `cpu`, one layer's worth for `ssd` so the rest goes to disk); `mixed` is an explicit
per-layer map (resident modules and the first `gpu_cached_layers` layers on the GPU, the next
`cpu_cache_layers` in RAM, the rest on disk). A CPU-only host runs everything on the CPU.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import torch

from worker import envs
from worker.config import RunConfig
from worker.errors import UserError
from worker.generate import Generation, generate, measure
from worker.host import devlock, reuse
from worker.host.walltime import RunClock
from worker.model import compile_cache
from worker.model.geometry import ModelConfig
from worker.model.step import Step
from worker.pack.source import SourceTensor, read_index
from worker.result import assemble_result, write_json
from worker.text.prompts import eos_ids, pad_id, prompt_ids_for
from worker.units import GB

log = logging.getLogger(__name__)

RESIDENT_MODULES = ("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head")
FREE_FRACTION = 0.9  # of the free card, when no --gpu-memory-limit-gb: headroom for activations and KV


# ---- what the checkpoint holds ------------------------------------------------------------------


def module_bytes(tensors: dict[str, SourceTensor], itemsize: int) -> dict[str, int]:
    """Top-level module ("model.layers.3", "model.embed_tokens", "lm_head") → bytes in the compute dtype
    (`tensors` is `worker.pack.source.read_index`: sizes come from the headers, no weights are read)."""
    sizes: dict[str, int] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        mod = ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else ".".join(parts[:-1])
        sizes[mod] = sizes.get(mod, 0) + math.prod(t.shape) * itemsize
    return sizes


# ---- where modules go -------------------------------------------------------------------------


@dataclass
class Placement:
    """An accelerate device map with the budgets it was built from and where the layers ended up."""

    device_map: dict[str, int | str]
    max_memory: dict[int | str, int] | None
    layers: dict[str, int] = field(default_factory=dict)  # "gpu" / "cpu" / "disk" → decoder layers
    notes: list[str] = field(default_factory=list)


def gpu_budget(cfg: RunConfig, device: torch.device) -> int:
    """Bytes of weights the peer may put on the GPU: the configured limit, else most of the free card."""
    if cfg.stream.gpu_memory_limit_gb is not None:
        return int(cfg.stream.gpu_memory_limit_gb * GB)
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * FREE_FRACTION)


def plan_placement(cfg: RunConfig, mc: ModelConfig, device: torch.device, sizes: dict[str, int],
                   dtype: torch.dtype, budget: int | None = None) -> Placement:
    """The device map for the run's mode and budgets (see the module docstring)."""
    n, mode = mc.num_hidden_layers, cfg.stream.mode
    if device.type != "cuda":
        notes = [] if mode == "gpu" else [f"peer on a CPU-only host: mode {mode} runs with all weights in RAM"]
        return Placement({"": "cpu"}, None, {"cpu": n}, notes)
    gpu = device.index if device.index is not None else torch.cuda.current_device()
    budget = gpu_budget(cfg, device) if budget is None else budget
    layer = max(sizes.get(f"model.layers.{i}", 0) for i in range(n))
    resident = sum(b for m, b in sizes.items() if not m.startswith("model.layers."))
    total = sum(sizes.values())
    if mode == "gpu":
        _fits(resident + n * layer <= budget, "gpu", total, budget, "use --mode cpu, ssd or mixed")
        return Placement({"": gpu}, {gpu: budget}, {"gpu": n})
    if mode == "mixed":
        return _mixed(cfg, n, gpu, budget, resident, layer)
    cpu_cap = psutil.virtual_memory().total if mode == "cpu" else layer
    max_memory = {gpu: budget, "cpu": cpu_cap}
    device_map = _auto_map(cfg.checkpoints, dtype, max_memory)
    if gpu not in device_map.values():  # accelerate would then run the whole model on the CPU
        raise UserError(f"accelerate peer, mode {mode}: a GPU budget of {budget / GB:.3g} GB holds no module next "
                        f"to accelerate's offload reserve ({layer / GB:.3g} GB, one layer); raise "
                        "--gpu-memory-limit-gb")
    plan = Placement(device_map, max_memory, _layer_counts(device_map, n, gpu))
    if plan.layers.get("gpu", 0) == n:
        plan.notes.append(f"peer mode {mode}: the whole model fits the GPU budget ({budget / GB:.1f} GB), so "
                          "accelerate offloads nothing; set --gpu-memory-limit-gb to compare offloading")
    return plan


def _fits(ok: bool, mode: str, need: int, budget: int, fix: str) -> None:
    if not ok:
        raise UserError(f"accelerate peer, mode {mode}: needs {need / GB:.3g} GB on the GPU but the budget is "
                        f"{budget / GB:.3g} GB; {fix}")


def _mixed(cfg: RunConfig, n: int, gpu: int, budget: int, resident: int, layer: int) -> Placement:
    g, c = cfg.stream.gpu_cached_layers, cfg.stream.cpu_cache_layers
    if g > n:
        raise UserError(f"gpu_cached_layers ({g}) is more than the model's {n} layers; lower --gpu-cached-layers")
    c = min(c, n - g)  # a CPU cache larger than what is left simply holds the rest
    streamed = n > g  # an offloaded layer needs room on the GPU while it runs
    _fits(resident + (g + streamed) * layer <= budget, "mixed", resident + (g + streamed) * layer, budget,
          "lower --gpu-cached-layers or raise --gpu-memory-limit-gb")
    dm: dict[str, int | str] = dict.fromkeys(RESIDENT_MODULES, gpu)
    for i in range(n):
        dm[f"model.layers.{i}"] = gpu if i < g else "cpu" if i < g + c else "disk"
    return Placement(dm, {gpu: budget, "cpu": psutil.virtual_memory().total},
                     {"gpu": g, "cpu": c, "disk": n - g - c})


def _auto_map(ckpt: str, dtype: torch.dtype, max_memory: dict[int | str, int]) -> dict[str, int | str]:
    """accelerate's own placement for these budgets, computed on a meta model (no weights read)."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.from_pretrained(ckpt, local_files_only=True)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    return dict(infer_auto_device_map(meta, max_memory=max_memory, dtype=dtype,
                                      no_split_module_classes=meta._no_split_modules))


def _layer_counts(device_map: dict[str, int | str], n: int, gpu: int) -> dict[str, int]:
    """Decoder layers per tier, resolving each layer to its longest matching device-map key."""
    counts: dict[str, int] = {}
    for i in range(n):
        name = f"model.layers.{i}"
        key = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")
                   or k.startswith(name + ".")), key=len, default="")
        where = device_map.get(key, "cpu")
        tier = "gpu" if where == gpu or where == f"cuda:{gpu}" else str(where)
        counts[tier] = counts.get(tier, 0) + 1
    return counts


# ---- the HF model behind the engine's forward ---------------------------------------------------


class PeerCache:
    """HF DynamicCache plus the 2-D padding mask of the right-padded batch (B, max_seq)."""

    def __init__(self, model, lens: list[int], max_seq: int, device: torch.device):
        from transformers import DynamicCache

        try:
            self.kv = DynamicCache(config=model.config)
        except TypeError:  # older transformers
            self.kv = DynamicCache()
        bsz = len(lens)
        self.lens = torch.tensor(lens, device=device)  # (B,)
        self.mask = torch.zeros(bsz, max_seq, dtype=torch.bool, device=device)  # (B, max_seq)
        # Prefill logits only where each row ends: the distinct last columns, known on the host.
        keep = sorted({n - 1 for n in lens})
        self.keep = torch.tensor(keep, device=device)  # (K,)
        self.cols = torch.tensor([keep.index(n - 1) for n in lens], device=device)  # (B,) index into keep

    def advance(self, step: Step) -> int:
        """Slots filled after this step. HF's cache grows one slot per step; the engine's `kv_len` is a
        bucketed attention span (see worker.generate.kv_span), so the length is counted here."""
        self.length = step.positions.shape[1] if step.is_prefill else self.length + 1
        return self.length

    def mask_for(self, step: Step, length: int) -> torch.Tensor:
        """The (B, length) mask of this step: real prompt tokens and every generated token."""
        if step.is_prefill:
            self.mask[:, :length] = torch.arange(length, device=self.mask.device)[None, :] < self.lens[:, None]
        else:
            self.mask[:, length - 1] = True
        return self.mask[:, :length]


class HFForward:
    """An HF causal LM with the engine's `forward(tokens, step, cache, logits_at)`."""

    def __init__(self, model):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
        self._cache_position = "cache_position" in params  # transformers 4 wants slot indices

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, step: Step, cache: PeerCache,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) → logits (B, V) at each row's last prompt token (prefill) or (B, T, V)."""
        t = tokens.shape[1]
        length = cache.advance(step)
        kw: dict[str, Any] = {self._cache_kw: cache.kv}
        if self._cache_position:
            kw["cache_position"] = torch.arange(length - t, length, device=tokens.device)
        keep = cache.keep if logits_at is not None else 0
        out = self.model(input_ids=tokens, attention_mask=cache.mask_for(step, length), position_ids=step.positions,
                         use_cache=True, logits_to_keep=keep, **kw)
        if logits_at is None:
            return out.logits  # (B, T, V)
        return out.logits[torch.arange(tokens.shape[0], device=tokens.device), cache.cols]  # (B, V)


def peer_generate(model, prompt_ids: list[list[int]], cfg: RunConfig, eos: tuple[int, ...], pad: int,
                  device: torch.device, keep_logits: bool = False, new_tokens: int | None = None) -> Generation:
    """One generate round of the HF model through the engine's own generation loop (`new_tokens`:
    default the run's max_new_tokens)."""
    cache = PeerCache(model, [len(p) for p in prompt_ids], cfg.max_seq_len, device)
    s = cfg.sampling
    return generate(HFForward(model), cache, prompt_ids, cfg.max_new_tokens if new_tokens is None else new_tokens,
                    s.temperature, s.top_p, s.seed, eos, pad, device, keep_logits=keep_logits)


def _check_loadable(ckpt: Path) -> None:
    """transformers finds safetensors weights by name: model.safetensors, or shards listed by their
    index. Without either it would fall back to a pytorch_model.bin, a pickle; refuse before it tries."""
    if not any((ckpt / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise UserError(f"the accelerate peer loads {ckpt} as safetensors only: transformers finds no "
                        "model.safetensors or model.safetensors.index.json there (sharded weights need their "
                        "index; `bench make-model` writes one)")


def load_model(ckpt: str, plan: Placement, dtype: torch.dtype, offload_dir: str):
    from transformers import AutoModelForCausalLM

    # safetensors only: a pytorch_model.bin beside the shards is a pickle, and loading it runs its code
    try:
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, device_map=plan.device_map,
                                                    max_memory=plan.max_memory, offload_folder=offload_dir,
                                                    local_files_only=True, use_safetensors=True).eval()
    except OSError as e:  # transformers names what it looked for; only safetensors are ever loaded
        raise UserError(f"the accelerate peer loads {ckpt} as safetensors only, and transformers could not: "
                        f"{str(e).splitlines()[0][:200]}") from None


# ---- one run ------------------------------------------------------------------------------------


def run_peer(cfg: RunConfig, device: torch.device, phase: Callable[[str], None],
             base_env: dict[str, str] | None = None, clock: RunClock | None = None) -> dict[str, Any]:
    """`bench run --engine accelerate`: the run's spec on HF + accelerate, as a `streambench.run/1` dict.
    `clock` (worker.run's) times the phases that apply (imports, tokenizer, placement and model load as
    `slots`, the rounds, close); pack, fill and probe stay 0: the peer has none of them."""
    clock = clock or RunClock()
    with clock.phase("imports"):
        from worker.text.checkpoint import load_tokenizer

    cfg = dataclasses.replace(cfg, engine="accelerate")
    mc = ModelConfig.from_hf_dir(cfg.checkpoints)
    dtype = getattr(torch, mc.dtype if cfg.dtype == "auto" else cfg.dtype)
    tensors = read_index(cfg.checkpoints)
    _check_loadable(Path(cfg.checkpoints))
    with clock.phase("tokenizer"):
        tok = load_tokenizer(cfg.checkpoints)
        prompt_ids = prompt_ids_for(tok, cfg)
    eos, pad = mc.eos_token_ids or eos_ids(tok), pad_id(tok)
    phase("load")
    compiled_since = compile_cache.counters()
    with clock.phase("imports"):  # what the placement and the load import first, timed apart from them
        import accelerate  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401
    with clock.phase("slots"):
        plan = plan_placement(cfg, mc, device, module_bytes(tensors, dtype.itemsize), dtype)
    log.info("peer: mode=%s device=%s dtype=%s layers per tier %s", cfg.stream.mode, device, dtype, plan.layers)
    os.makedirs(envs.cache_dir(), exist_ok=True)
    keys = [devlock.device_key(device), devlock.disk_key(cfg.checkpoints), devlock.disk_key(envs.cache_dir())]
    with devlock.hold(keys, cfg.device_wait_s) as held, \
            tempfile.TemporaryDirectory(prefix="peer-offload-", dir=envs.cache_dir()) as offload:
        with clock.phase("slots"):
            model = load_model(cfg.checkpoints, plan, dtype, offload)
        try:
            gen = _measure(model, cfg, prompt_ids, eos, pad, device, phase, clock)
        finally:
            with clock.phase("close"):
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    n_params = sum(math.prod(t.shape) for t in tensors.values())
    model_block = {"name": Path(cfg.checkpoints).name, "n_layers": mc.num_hidden_layers,
                   "dtype": str(dtype).removeprefix("torch."), "hidden_size": mc.hidden_size,
                   "n_params": n_params, "weight_bytes": n_params * dtype.itemsize, "weight_format": "native"}
    warnings = plan.notes + (["peer disk offload reads the safetensors files through the page cache "
                              "(accelerate memory-maps them)"] if plan.layers.get("disk") else [])
    result = assemble_result(cfg, model_block, device, gen, prompt_ids, tok, base_env or {},
                             io={"warnings": warnings}, locks=held)
    result["locks"] = held.to_dict()  # with the release time
    result["compile_cache"] = compile_cache.report(compiled_since)  # the same record as the engine's
    result["reuse"] = reuse.record()  # the peer always loads its own copy
    result["setup"] = clock.report()
    if cfg.out_json:
        write_json(result, cfg.out_json)
    phase("done")
    return result


def _measure(model, cfg: RunConfig, prompt_ids, eos, pad, device: torch.device, phase, clock: RunClock) -> Generation:
    """The engine's rounds, except that a peer warm-up round generates as many tokens as the measured one."""
    def once(new_tokens: int) -> Generation:
        return peer_generate(model, prompt_ids, cfg, eos, pad, device, new_tokens=new_tokens)

    return measure(clock.rounds_of(once, cfg.warmup_rounds), cfg.warmup_rounds, cfg.max_new_tokens, device, phase,
                   warmup_tokens=None)
