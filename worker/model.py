"""The Llama forward (as HF `LlamaForCausalLM`), over weights and a KV cache it does not own.

Per layer the loop reads `wait(layer, kind) → compute → release(layer, kind)`: the weight source
(all-resident or a streamer) hands out a group's tensors on the compute device and learns when the
compute that reads them has been issued, so it can prefetch ahead and reuse slots. Every mode runs
exactly these kernels on the same shapes, which is why streaming modes equal `gpu` mode bit for bit.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from worker import rope
from worker.kvcache import Step
from worker.model_config import ModelConfig

Group = dict[str, torch.Tensor]


class WeightSource(Protocol):
    def resident(self) -> Group: ...
    def begin_pass(self) -> None: ...
    def wait(self, layer: int, kind: str) -> Group: ...
    def release(self, layer: int, kind: str) -> None: ...


class KVCacheLike(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> torch.Tensor: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back before the weight, as HF does."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _embed(tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Gather embedding rows; a streaming engine may keep the table in host memory to save GPU memory
    (a gather is exact, so where it runs does not change the result)."""
    if table.device == tokens.device:
        return F.embedding(tokens, table)
    return F.embedding(tokens.to(table.device), table).to(tokens.device)


class Llama:
    def __init__(self, cfg: ModelConfig, weights: WeightSource, device: torch.device):
        self.cfg = cfg
        self.weights = weights
        self.freq = rope.inv_freq(cfg, device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, step: Step, cache: KVCacheLike,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) → logits (B, V) at column `logits_at` (B,) of each row, or (B, T, V) if None."""
        res = self.weights.resident()
        h = _embed(tokens, res["embed_tokens"])  # (B, T, D)
        cos, sin = rope.cos_sin(self.freq, step.positions, h.dtype)
        self.weights.begin_pass()
        for layer in range(self.cfg.num_hidden_layers):
            g = self.weights.wait(layer, "attn")
            h = h + self._attention(layer, g, h, cos, sin, step, cache)
            self.weights.release(layer, "attn")
            g = self.weights.wait(layer, "ffn")
            h = h + self._mlp(g, h)
            self.weights.release(layer, "ffn")
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at]  # (B, D)
        h = rms_norm(h, res["norm"], self.cfg.rms_norm_eps)
        return F.linear(h, res.get("lm_head", res["embed_tokens"]))

    def _attention(self, layer: int, g: Group, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   step: Step, cache: KVCacheLike) -> torch.Tensor:
        c = self.cfg
        b, t, _ = h.shape
        x = rms_norm(h, g["input_layernorm"], c.rms_norm_eps)
        q = F.linear(x, g["q_proj"]).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = F.linear(x, g["k_proj"]).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = F.linear(x, g["v_proj"]).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)  # (B, H|KV, T, hd)
        o = cache.attend(layer, q, k, v, step)  # (B, H, T, hd)
        return F.linear(o.transpose(1, 2).reshape(b, t, -1), g["o_proj"])

    def _mlp(self, g: Group, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, g["post_attention_layernorm"], self.cfg.rms_norm_eps)
        return F.linear(F.silu(F.linear(x, g["gate_proj"])) * F.linear(x, g["up_proj"]), g["down_proj"])
