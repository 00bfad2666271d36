"""Batched generation as in the seed: right-padded prompts in one tensor, prefill, then decode.

Each row keeps its own positions, so every row computes what it would compute alone. Decode never
waits on the host per token: the "all rows finished" flag is copied to pinned memory asynchronously
and read one step later, and per-token times are CUDA events read after the run. `measure` is the
benchmark's rounds around it, the same for both engines: untimed warm-up rounds, then one measured round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from worker.host.timing import Clock, host_ms
from worker.model.step import Step
from worker.sampling import sample

log = logging.getLogger(__name__)

# A warm-up round exists to load kernels, fill allocators and start the streaming threads: a prefill
# and a couple of decode steps exercise every code path; more would only cost time on slow tiers.
WARMUP_TOKENS = 3


@dataclass
class Generation:
    token_ids: list[list[int]]  # per row, generated tokens up to and including the first EOS
    ttft_ms: float
    prefill_ms: float
    decode_ms: float
    e2e_ms: float
    decode_steps: int
    itl_ms: list[float] = field(default_factory=list)  # one per decode step
    logits: list[torch.Tensor] = field(default_factory=list)  # per step (B, V) on the host, on request
    prefetched: dict[str, int] = field(default_factory=dict)  # bytes fetched ahead before the round (see roofline)


class _DoneFlag:
    """Whether every row hit EOS, learned without stalling the device (one step late on CUDA)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = torch.zeros(1, dtype=torch.bool, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.known_done = False

    def push(self, done: torch.Tensor) -> None:
        if not self.cuda:
            self.known_done = bool(done.all())
            return
        self.host.copy_(done.all().reshape(1), non_blocking=True)
        self.event.record()

    def poll(self) -> bool:
        if self.cuda and not self.known_done and self.event.query():
            self.known_done = bool(self.host.item())
        return self.known_done


# Decode attends over a KV span rounded up to this many positions (masked beyond each row's end): the
# shapes, hence the kernels, change once per bucket instead of every token, so a CUDA graph per bucket
# can replay them and lazily loaded kernel variants stop costing time in the decode loop.
KV_BUCKET = 256


def kv_span(width: int, t: int, capacity: int, bucket: int = KV_BUCKET) -> int:
    """Cache positions decode step `t` (1-based) attends over, for prompts right-padded to `width`.
    It depends on the cache capacity, not on how many tokens a round generates, so a short warm-up
    round uses (and loads the kernels of) the same shapes as the measured round."""
    return min(-(-(width + t) // bucket) * bucket, capacity)


def decode_spans(width: int, max_new_tokens: int, capacity: int) -> list[int]:
    """Every span a generation's decode steps use (to prepare one CUDA graph per span)."""
    return sorted({kv_span(width, t, capacity) for t in range(1, max_new_tokens)})


def generate(model, cache, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
             top_p: float, seed: int, eos_ids: tuple[int, ...], pad_id: int, device: torch.device,
             keep_logits: bool = False, decode=None, capacity: int | None = None) -> Generation:
    """`decode(tokens (B, 1), step) -> logits (B, V)` replaces the eager decode forward (CUDA graphs);
    `capacity` is the cache's length (default: just long enough for this generation)."""
    clock = Clock(device)
    clock.sync()
    t0 = time.perf_counter()
    bsz = len(prompt_ids)
    lens = torch.tensor([len(p) for p in prompt_ids])
    width = int(lens.max())
    tokens = torch.full((bsz, width), pad_id, dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        tokens[i, : len(ids)] = torch.as_tensor(ids)
    tokens = tokens.to(device, non_blocking=True)
    lens_dev = lens.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor(eos_ids or (-1,), device=device)

    p0 = clock.mark()
    positions = torch.arange(width, device=device).expand(bsz, width)
    logits = model.forward(tokens, Step(positions, width, tuple(lens.tolist())), cache,
                           logits_at=lens_dev - 1)  # (B, V)
    nxt = sample(logits, temperature, top_p, gen)
    p1 = clock.mark()
    trace = [logits.cpu()] if keep_logits else []
    out = torch.full((bsz, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out[:, 0] = nxt
    done = torch.isin(nxt, eos)
    nxt.cpu()  # the first token on the host: TTFT
    ttft = host_ms(t0)

    flag = _DoneFlag(device)
    flag.push(done)
    marks = [clock.mark()]
    pos = lens_dev.clone()  # position of the token fed next, per row
    steps = 0
    for t in range(1, max_new_tokens):
        if flag.poll():
            break
        step = Step(pos[:, None], kv_span(width, t, capacity or width + max_new_tokens))
        logits = decode(nxt[:, None], step) if decode else model.forward(nxt[:, None], step, cache)[:, 0]
        if keep_logits:
            trace.append(logits.cpu())
        nxt = torch.where(done, pad_id, sample(logits, temperature, top_p, gen))
        out[:, t] = nxt
        done |= torch.isin(nxt, eos)
        pos += 1
        flag.push(done)
        marks.append(clock.mark())
        steps += 1
    clock.sync()
    e2e = host_ms(t0)
    itl = [clock.ms(a, b) for a, b in zip(marks, marks[1:])]
    return Generation(
        token_ids=_cut_at_eos(out.tolist(), set(eos_ids)),
        ttft_ms=ttft, prefill_ms=clock.ms(p0, p1), decode_ms=sum(itl), e2e_ms=e2e,
        decode_steps=steps, itl_ms=itl, logits=trace,
    )


def _cut_at_eos(rows: list[list[int]], eos: set[int]) -> list[list[int]]:
    out = []
    for row in rows:
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        out.append(row[:cut])
    return out


def measure(one_round: Callable[[int], Generation], warmup_rounds: int, max_new_tokens: int, device: torch.device,
            phase: Callable[[str], None], warmup_tokens: int | None = WARMUP_TOKENS,
            prepare: Callable[[], None] = lambda: None,
            start: Callable[[], dict[str, int]] = dict) -> Generation:
    """Warm-up rounds, then the measured round: `one_round(new_tokens)` generates one round.

    Warm-up rounds generate `warmup_tokens` tokens (at most `max_new_tokens`; None: all of them).
    `prepare` runs after them and before peak memory is reset (set-up the measured round must not pay
    for, such as capturing CUDA graphs); `start` runs just before the measured round (reset counters)
    and returns the bytes fetched ahead so far (`Generation.prefetched`).
    """
    warmup = max_new_tokens if warmup_tokens is None else min(max_new_tokens, warmup_tokens)
    for i in range(warmup_rounds):
        phase("warmup")
        log.info("warm-up round %d/%d", i + 1, warmup_rounds)
        one_round(warmup)
    prepare()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    prefetched = start()
    phase("measure")
    gen = one_round(max_new_tokens)
    gen.prefetched = prefetched
    return gen
