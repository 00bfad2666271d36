"""Typed configuration of one benchmark run.

One path for every setting: dataclass defaults, then the seed's `WSM_*` environment switches
(`worker.envs`), then suite YAML or `bench run` flags. Leaf field names are unique across the
sub-configs, so a suite's matrix, the CLI and `RunConfig.from_flat` all use the same flat names
(`prefetch_distance`, `kv_offload`, ...). Each field's `help` metadata is its documentation and the
CLI's help text. Values are checked where they enter: pydantic validates types and `Field` bounds (on
construction too: these are pydantic dataclasses), `__post_init__` the rules that tie fields
together, and `RunConfig.from_dict` turns a failure into a one-line `UserError` naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from worker.errors import UserError, one_line
from worker.quant.formats import WeightFormat, WeightSpec

Mode = Literal["gpu", "cpu", "ssd", "mixed"]
CpuPolicy = Literal["rolling", "pinned-subset"]
KvOffload = Literal["none", "cpu", "ssd"]
Engine = Literal["streaming", "accelerate"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
Device = Literal["auto", "cuda", "cpu"]
AccuracyRef = Literal["native"]

_STRICT = ConfigDict(extra="forbid")
Count = Annotated[int, Field(ge=0)]  # zero allowed
Positive = Annotated[int, Field(ge=1)]


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A field with its help text; mutable defaults go through default_factory."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass(config=_STRICT)
class StreamConfig:
    """How weights move SSD → pinned CPU → GPU (the seed's WSM)."""

    mode: Mode = _f("gpu", "Where weights live: gpu (all resident), cpu (pinned RAM, streamed H2D), "
                    "ssd (streamed from the SSD tier), mixed (GPU layers + CPU cache + SSD).")
    prefetch_distance: Count = _f(6, "Layers the GPU tier prefetches ahead of the compute.")
    group_prefetch_depth: Positive = _f(4, "Groups (attn/ffn) the GPU tier keeps in flight ahead.")
    gpu_cached_layers: Count = _f(4, "Layers kept resident on the GPU in mixed mode.")
    cpu_cache_layers: Count = _f(40, "Layers held in pinned CPU memory in mixed mode.")
    cpu_policy: CpuPolicy = _f("pinned-subset", "CPU tier policy: a pinned subset of layers (default: reads "
                               "fewer SSD bytes per token, so it decodes faster; measured: "
                               "benchmarks/results/README.md) or the seed's rolling window.")
    cpu_ring_offset: Count = _f(0, "Rolling window anchor: current layer + this offset (WSM_CPU_RING_OFFSET).")
    cpu_wrap_around: bool = _f(True, "Rolling window wraps from the last layer to layer 0 (WSM_CPU_WRAP_AROUND).")
    cpu_roll_stride: Positive = _f(1, "Layers the rolling window advances per step (WSM_CPU_ROLL_STRIDE).")
    cpu_roll_sync: bool = _f(True, "Rolling window advances in step with the compute (WSM_CPU_ROLL_SYNC).")
    aggressive_gpu_prefetch: Count = _f(2, "Groups prefetched eagerly: 2 = current ffn + next attn "
                                        "(WSM_AGGRESSIVE_GPU_PREFETCH).")
    h2d_group_backlog_max: Positive = _f(1, "Most H2D group copies queued at once (WSM_H2D_GROUP_BACKLOG_MAX).")
    gpu_max_groups: Positive = _f(10, "GPU group slots preallocated for streamed weights (WSM_GPU_MAX_GROUPS).")
    skip_preload_wait: bool = _f(True, "Start computing without waiting for the warm-up preload "
                                 "(WSM_SKIP_PRELOAD_WAIT).")
    evict_finished: bool = _f(True, "Free a group slot as soon as its compute finished (WSM_EVICT_FINISHED).")
    balance_prefetch: bool = _f(True, "Balance attn/ffn groups in flight (WSM_BALANCE_PREFETCH). No effect: groups "
                                "are fetched strictly in consumption order, so attn and ffn alternate by construction.")
    balance_tol: Count = _f(1, "Allowed attn/ffn imbalance in flight (WSM_BALANCE_TOL). No effect: fetching in "
                            "consumption order keeps the imbalance at most 1 by construction.")
    pair_ahead: Count = _f(2, "Layers searched ahead for the nearest group to prefetch (WSM_PAIR_AHEAD). No effect: "
                           "the next group fetched is always the nearest one the compute needs.")
    kind_ahead_cap: Positive = _f(2, "Most layers one group kind may run ahead (WSM_KIND_AHEAD_CAP).")
    warmup_layers: Count = _f(4, "Layers preloaded to the GPU before the first forward.")
    staging_mb: Positive = _f(64, "Size of each pinned staging buffer of the SSD tier, MiB.")
    warm_page_cache: bool = _f(False, "Setup reads (the CPU tier's fill, the device-resident groups' load) of "
                               "blob ranges that are not in the page cache go through it (buffered) instead of "
                               "O_DIRECT, so the next run on this host reads them at memory speed; the SSD tier's "
                               "streamed reads stay O_DIRECT. Off: such ranges are read O_DIRECT in every run.")
    embed_zero_copy: bool = _f(True, "The embedding table a streaming mode keeps in host memory is page-locked and "
                               "mapped into the GPU, whose gather reads the step's rows from there (the token ids "
                               "never leave the device); --no-embed-zero-copy: the ids go to the host every step, "
                               "which gathers and copies the rows up (a device sync per step; for comparison).")
    fill_behind: bool = _f(False, "The CPU tier's fill runs behind the model build and the warm-up instead of "
                           "before them: the warm-up's compile overlaps the disk reads, each group is copied to "
                           "the GPU once its bytes are read and pinned, and the measured round starts after the "
                           "whole fill (setup time only; not yet measured on a GPU, hence off).")
    ssd_readers: Positive = _f(8, "Reader threads of the SSD tier.")
    gpu_memory_limit_gb: Annotated[float, Field(gt=0)] | None = _f(
        None, "Cap on GPU memory the engine may use, GB (lets a big card act as a small one).")


@dataclass(config=_STRICT)
class KVConfig:
    """The paged KV cache: block size, GPU budget, offload tier, top-k block attention."""

    kv_offload: KvOffload = _f("none", "Where KV blocks beyond the GPU budget go: none, cpu or ssd.")
    kv_block_tokens: Positive = _f(16, "Tokens per KV block.")
    kv_gpu_blocks: Positive | None = _f(None, "KV blocks kept on the GPU per (batch row, layer); unset = all.")
    topk_blk: Count = _f(0, "Attend only to the k most relevant KV blocks in decode; 0 = exact.")
    topk_tokens: Positive | None = _f(None, "Top-k budget in tokens per (batch row, layer), e.g. 1024: the "
                                      "ceil(topk_tokens / kv_block_tokens) most relevant blocks; exclusive "
                                      "with topk_blk; unset = topk_blk decides.")
    topk_key_bits: Annotated[int, Field(ge=1, le=4)] = _f(2, "Bits per key and channel in each KV block's summary "
                                                          "that top-k scores blocks by (1-4): more bits rank blocks "
                                                          "closer to exact attention, for more GPU memory and "
                                                          "scoring time. No effect without top-k.")
    kv_zero_copy: bool = _f(True, "Top-k reads its chosen blocks from the pinned CPU tier on the device (mapped host "
                            "memory, the ids never leave the GPU); --no-kv-zero-copy: the ids go to the host, which "
                            "gathers and copies the blocks (slower; for comparison). No effect without top-k or with "
                            "kv_offload ssd (always host-gathered).")
    kv_throttle_threshold: Positive = _f(8, "Most queued KV offload writes before back-off "
                                         "(WSM_KV_THROTTLE_THRESHOLD).")
    kv_throttle_ms: Count = _f(16, "Back-off when the KV write queue is full, ms (WSM_KV_THROTTLE_MS).")

    def __post_init__(self) -> None:
        if self.topk_tokens is None:
            return
        if self.topk_blk:
            raise ValueError(f"topk_tokens and topk_blk are exclusive: give the top-k budget in tokens or in blocks "
                             f"(got topk_tokens={self.topk_tokens}, topk_blk={self.topk_blk})")
        if self.topk_tokens <= self.kv_block_tokens:
            raise ValueError(f"topk_tokens must be more than kv_block_tokens ({self.kv_block_tokens}): the first "
                             f"(sink) block and the block being written are always kept (got {self.topk_tokens})")

    @property
    def topk_blocks(self) -> int:
        """The top-k budget in blocks per (batch row, layer); 0 = exact attention."""
        return -(-self.topk_tokens // self.kv_block_tokens) if self.topk_tokens is not None else self.topk_blk

    @property
    def topk_budget_tokens(self) -> int:
        """The top-k budget in tokens as asked (topk_tokens, else topk_blk blocks of tokens); 0 = exact."""
        return self.topk_tokens if self.topk_tokens is not None else self.topk_blk * self.kv_block_tokens


@dataclass(config=_STRICT)
class SamplingConfig:
    """Token sampling; temperature 0 is greedy."""

    temperature: Annotated[float, Field(ge=0)] = _f(0.6, "Sampling temperature; 0 = greedy.")
    top_p: Annotated[float, Field(gt=0, le=1)] = _f(0.9, "Nucleus sampling mass.")
    seed: int = _f(0, "Seed for prompt synthesis and sampling.")


@dataclass(config=_STRICT)
class RunConfig:
    """One benchmark run: the seed's `bench_infer.py` flags, plus the sub-configs."""

    checkpoints: str = _f("", "HF checkpoint directory (config.json, *.safetensors, tokenizer).")
    engine: Engine = _f("streaming", "streaming (this engine) or accelerate (the HF peer).")
    manifest: str | None = _f(None, "Runtime manifest of an existing pack (else packed on first use).")
    raw_device: str | None = _f(None, "Block device or file holding the packed weights.")
    pack_dir: str | None = _f(None, "Where `bench run` caches its pack (default: next to the checkpoint).")
    prompt: str | None = _f(None, "One prompt text.")
    prompts: str | None = _f(None, "Prompt file: one prompt per line.")
    prompt_len: int | None = _f(None, "Synthesize prompts of exactly this many tokens "
                                "(used when neither --prompt nor --prompts is given; default 128).")
    batch_size: Positive = _f(1, "Prompts per batch.")
    max_new_tokens: Positive = _f(32, "Tokens to generate per prompt.")
    max_seq_len: Positive = _f(2048, "Longest sequence (prompt + generated); prompts keep their last "
                               "max_seq_len - max_new_tokens tokens.")
    warmup_rounds: Count = _f(1, "Untimed generate rounds before the measured one.")
    dtype: DType = _f("auto", "Compute dtype; auto = the checkpoint's.")
    weight_format: WeightFormat = _f("native", "How the pack stores the layers' projections: native (the compute "
                                     "dtype), int8 (symmetric, per output channel), int4 (asymmetric, groups of "
                                     "quant_group_size inputs) or fp8 (float8 e4m3, per output channel); quantized "
                                     "bytes cross the SSD and PCIe and are dequantized in the layer's compute. A "
                                     "pre-quantized checkpoint packs as its own format. Streaming engine only.")
    quant_group_size: Positive = _f(128, "int4: inputs per scale/zero group; must divide every projection's input "
                                    "dimension. No effect for native and int8.")
    quantize_head: bool = _f(False, "Quantize lm_head too (an untied one; norms and embeddings always stay native). "
                             "No effect for native.")
    accuracy_ref: AccuracyRef | None = _f(None, "After the measured round (untimed), compare a quantized run's "
                                          "next-token distributions with the native checkpoint's on the same "
                                          "tokens: teacher-forced top-1 agreement and mean KL over the generated "
                                          "positions (worker/quant/accuracy.py). Needs weight_format int8, int4 "
                                          "or fp8.")
    device: Device = _f("auto", "Compute device; auto = CUDA when present, else CPU.")
    verbose: bool = _f(False, "Log the engine's decisions.")
    compile: bool = _f(True, "On CUDA, torch.compile each layer's math into fused kernels (--no-compile: eager).")
    compile_ahead: bool = _f(True, "Import the compiler (torch._dynamo, Inductor) on a side thread from the run's "
                                   "start, beside tokenizer, pack, fill and upload, instead of in the model build: "
                                   "setup time only (same kernels, same tokens; benchmarks/results/setup_h200/).")
    gc_freeze: bool = _f(True, "During the warm-up and measured rounds, freeze the objects setup made and pause "
                               "Python's cyclic garbage collector (restored after): a full collection of a process "
                               "that imported the compiler holds the interpreter for 0.1-0.3 s, and one that falls "
                               "in the measured round stalls the thread issuing the weight copies "
                               "(benchmarks/results/setup_h200/v5/I; --no-gc-freeze: collections as Python schedules "
                               "them).")
    switch_interval_us: Annotated[int, Field(gt=0)] | None = _f(
        None, "Python's thread switch interval during the rounds, microseconds (default: Python's 5000): how long "
              "the compute thread may keep the interpreter while the fetch thread waits to issue a copy (an A/B "
              "switch, like gc_freeze).")
    cuda_graphs: bool = _f(True, "Replay the gpu-mode decode step as CUDA graphs (KV on the GPU, or steady "
                                 "top-k steps over a CPU tier the GPU maps; --no-cuda-graphs: eager).")
    roofline: bool = _f(True, "Probe this host once (cached) and report the run's I/O floor and attainment.")
    floor_window_s: Annotated[float, Field(ge=0)] = _f(2.0, "Seconds of SSD reads, with the SSD tier's own "
                                                       "settings, just before and just after a run that streams "
                                                       "from the SSD: its floor's SSD figure (0: the probe's).")
    device_wait_s: Annotated[float, Field(ge=0)] = _f(600.0, "Seconds to wait for a GPU or disk another engine "
                                                     "on this host holds (0: fail at once).")
    pack_verify_days: Annotated[float, Field(ge=0)] = _f(7.0, "Verify every checksum of the pack when its last full "
                                                        "verification is older than this (0: before every run); "
                                                        "otherwise only each group's first and last 4 KiB.")
    out_json: str | None = _f("bench_results.json", "Where the run's JSON goes.")
    stream: StreamConfig = field(default_factory=StreamConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.quant_group_size % 2:
            raise ValueError(f"quant_group_size must be even: two int4 values share a byte "
                             f"(got {self.quant_group_size})")
        if self.engine == "accelerate" and self.weight_format != "native":
            raise ValueError(f"weight_format {self.weight_format} is for the streaming engine; the accelerate peer "
                             "runs the checkpoint as it is: drop weight_format or use engine streaming")
        if self.accuracy_ref is not None and self.weight_format == "native":
            raise ValueError(f"accuracy_ref {self.accuracy_ref} compares a quantized run with the native weights: "
                             "give weight_format int8, int4 or fp8 (a native run is its own reference)")
        if self.max_new_tokens >= self.max_seq_len:
            raise ValueError(f"max_new_tokens must be < max_seq_len ({self.max_seq_len}) so the prompt keeps at least "
                             f"one token (got {self.max_new_tokens})")
        given = [n for n in ("prompt", "prompts", "prompt_len") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"prompt/prompts/prompt_len are exclusive: give one (got {given})")
        if self.prompt_len is not None and not 1 <= self.prompt_len <= self.max_prompt_tokens:
            raise ValueError(f"prompt_len must be in [1, max_seq_len - max_new_tokens = {self.max_prompt_tokens}] "
                             f"(got {self.prompt_len})")

    @property
    def weights(self) -> WeightSpec:
        """The pack's weight format as the packer and the pack cache take it."""
        return WeightSpec(self.weight_format, self.quant_group_size, self.quantize_head)

    @property
    def max_prompt_tokens(self) -> int:
        """The seed's safe prompt length: prompt + generated never exceeds max_seq_len."""
        return self.max_seq_len - self.max_new_tokens

    # ---- flat view: the names suites and the CLI use -------------------------------------------

    def to_flat(self) -> dict[str, Any]:
        return {f.name: getattr(sub, f.name) for sub, f in _leaves(self)}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_flat(cls, values: dict[str, Any], base: RunConfig | None = None, where: str = "config") -> RunConfig:
        """Build a config from flat leaf names over `base`, validating types, ranges and unknown keys."""
        owner = flat_owners()
        unknown = sorted(set(values) - set(owner))
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(owner))}")
        nested = (base or cls()).to_dict()
        for key, value in values.items():
            target = nested if owner[key] is None else nested[owner[key]]
            target[key] = value
        return cls.from_dict(nested, where=where)

    @classmethod
    def from_dict(cls, nested: dict[str, Any], where: str = "config") -> RunConfig:
        try:
            return _ADAPTER.validate_python(nested)
        except ValidationError as e:
            raise UserError(f"{where}: {one_line(e, leaf=True)}") from None


def _leaves(cfg: RunConfig):
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                yield value, sub
        else:
            yield cfg, f


def flat_owners() -> dict[str, str | None]:
    """Leaf name → the sub-config holding it (None for RunConfig's own fields)."""
    owners: dict[str, str | None] = {}
    for f in dataclasses.fields(RunConfig):
        if isinstance(f.type, str) and f.type.endswith("Config"):
            for sub in dataclasses.fields(_SUBCONFIGS[f.name]):
                owners[sub.name] = f.name
        else:
            owners[f.name] = None
    return owners


def flat_fields() -> list[dataclasses.Field]:
    """Every leaf field in declaration order (the CLI builds its options from these)."""
    out = []
    for f in dataclasses.fields(RunConfig):
        out.extend(dataclasses.fields(_SUBCONFIGS[f.name]) if f.name in _SUBCONFIGS else [f])
    return out


_SUBCONFIGS = {"stream": StreamConfig, "kv": KVConfig, "sampling": SamplingConfig}
_ADAPTER = TypeAdapter(RunConfig)
