"""Where each layer lives, and how far ahead the GPU tier may fetch.

Homes: `gpu` (resident), `cpu` (pinned RAM for the whole run), `ssd` (read through staging buffers
every pass) and `ring` (the seed's rolling CPU window, refilled from the SSD every pass). For a cyclic
scan larger than RAM, a fixed subset reads (layers − cached) from the SSD per pass while the ring
reads every streamed layer, which is why `pinned-subset` spreads its cached layers evenly among the
SSD layers: the SSD reader then always has the next extent to read while RAM layers stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.config import StreamConfig
from worker.errors import UserError
from worker.pack.groups import KINDS, GroupKey


@dataclass(frozen=True)
class Placement:
    home: tuple[str, ...]  # per layer: "gpu" | "cpu" | "ssd" | "ring"
    ring_slots: int = 0

    def layers(self, home: str) -> list[int]:
        return [i for i, h in enumerate(self.home) if h == home]

    def streamed(self) -> list[GroupKey]:
        """Every group that is fetched each pass, in consumption order."""
        return [GroupKey(i, k) for i, h in enumerate(self.home) if h != "gpu" for k in KINDS]


def _spread(candidates: list[int], k: int) -> set[int]:
    """k of the candidates, evenly spaced."""
    n = len(candidates)
    return {candidates[(j * n) // k] for j in range(k)} if k else set()


def place(mode: str, n_layers: int, s: StreamConfig) -> Placement:
    if mode == "gpu":
        return Placement(("gpu",) * n_layers)
    if mode == "cpu":
        return Placement(("cpu",) * n_layers)
    if mode == "ssd":
        return Placement(("ssd",) * n_layers)
    g, c = s.gpu_cached_layers, s.cpu_cache_layers
    if g > n_layers:
        raise UserError(f"gpu_cached_layers={g} is more than the model's {n_layers} layers")
    if g + c > n_layers:
        raise UserError(f"gpu_cached_layers + cpu_cache_layers = {g} + {c} is more than the model's {n_layers} "
                        f"layers; lower --cpu-cache-layers to at most {n_layers - g}")
    rest = list(range(g, n_layers))
    home = ["gpu"] * g + [""] * (n_layers - g)
    if s.cpu_policy == "rolling" and c > 0:
        for i in rest:
            home[i] = "ring"
        return Placement(tuple(home), ring_slots=c)
    cached = _spread(rest, c)
    for i in rest:
        home[i] = "cpu" if i in cached else "ssd"
    return Placement(tuple(home))


def lookahead(s: StreamConfig) -> int:
    """Groups the GPU tier may have fetched beyond the one being computed.

    Fetches are issued strictly in consumption order (a FIFO copy engine serves them in that order
    anyway), so attn and ffn alternate and the seed's balance rules hold by construction
    (|attn ahead − ffn ahead| ≤ 1 ≤ balance_tol, nearest group first within pair_ahead); what remains
    is how far ahead to go: group_prefetch_depth groups, within prefetch_distance layers and
    kind_ahead_cap layers per kind, but at least the aggressive minimum (current ffn + next attn).
    """
    ahead = min(s.group_prefetch_depth, 2 * s.prefetch_distance, 2 * s.kind_ahead_cap + 1)
    return max(ahead, s.aggressive_gpu_prefetch, 1)
