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


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits → (B,) next token ids; greedy when temperature == 0."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    probs = logits_to_probs(logits, temperature, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
