"""Token sampling as small pure functions: temperature, top-p (nucleus), greedy at temperature 0."""

from __future__ import annotations

import torch


def logits_to_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(B, V) logits → (B, V) float32 probabilities after temperature and nucleus truncation."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    # drop a token when the mass before it already reaches top_p (the top token always stays)
    drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) > top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) → (B,) argmax, first index among equal maxima, as `torch.argmax`. On CUDA a single-row
    argmax over a 128k vocabulary is one long serial reduction, a visible part of a batch-1 decode
    step (measured: benchmarks/results/README.md); reducing chunks first and then their maxima
    spreads it over the card. Chunks are taken in index order, so the first maximum stays the first."""
    chunk = next((c for c in (512, 256, 128) if logits.shape[1] % c == 0 and logits.shape[1] // c >= 8), 0)
    if logits.device.type != "cuda" or not chunk:
        return torch.argmax(logits, dim=-1)
    return chunked_argmax(logits, chunk)


def chunked_argmax(logits: torch.Tensor, chunk: int) -> torch.Tensor:
    """`greedy` in two stages; V must be a multiple of `chunk`."""
    b, v = logits.shape
    best, at = logits.view(b, v // chunk, chunk).max(dim=-1)  # (B, V / chunk) each chunk's max, first index
    c = torch.argmax(best, dim=-1, keepdim=True)  # (B, 1) the first chunk holding the overall max
    return (c * chunk + at.gather(1, c)).squeeze(1)


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits → (B,) next token ids; greedy when temperature == 0."""
    if temperature == 0:
        return greedy(logits)
    probs = logits_to_probs(logits, temperature, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
