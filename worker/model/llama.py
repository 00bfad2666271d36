"""The Llama forward (as HF `LlamaForCausalLM`), over weights and a KV cache it does not own.

Per layer the loop reads `wait(attn) → attention + output projection → release(attn) → wait(ffn) →
MLP → release(ffn)`: the weight source (all-resident or a streamer) hands out a group's tensors on the
compute device and learns when the compute that reads them has been issued, so it can prefetch ahead
and reuse slots. Each group is released right after its last reader: when the attn group was held to
the end of the layer, the next layer's attn copy waited behind this layer's MLP, and the copy engine
sat idle through every 70B layer's MLP in a 2048-token prefill with one attn slot
(measured: benchmarks/results/README.md). Every mode runs exactly these kernels on the same shapes,
which is why streaming modes equal `gpu` mode bit for bit. A quantized pack's projections arrive as
their parts and each projection's matmul reads them through `worker.quant.matmul.linear`: a fused
dequantize-matmul for decode-sized inputs on CUDA, otherwise a dense matmul after dequantizing to
scratch, chosen by shapes alone, so the same in every mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.model import rope
from worker.model.compiled import compiled
from worker.model.geometry import ModelConfig
from worker.model.step import KVCacheLike, Step, WeightSource
from worker.quant.dequant import Weight, has, joined, weight
from worker.quant.matmul import linear


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


def attn_in(h: torch.Tensor, norm_w: torch.Tensor, w_qkv: Weight, cos: torch.Tensor, sin: torch.Tensor,
            eps: float, heads: int, kv_heads: int, head_dim: int):
    """Pre-attention norm, the q|k|v projection and RoPE: h (B, T, D) → q (B, H, T, hd), k, v (B, KV, T, hd)."""
    b, t, _ = h.shape
    qkv = linear(rms_norm(h, norm_w, eps), w_qkv)  # (B, T, (H + 2 KV) hd)
    q, k, v = qkv.split((heads * head_dim, kv_heads * head_dim, kv_heads * head_dim), dim=-1)
    q = q.reshape(b, t, heads, head_dim).transpose(1, 2)
    k = k.reshape(b, t, kv_heads, head_dim).transpose(1, 2)
    v = v.reshape(b, t, kv_heads, head_dim).transpose(1, 2)
    return rope.apply(q, cos, sin), rope.apply(k, cos, sin), v


def attn_out(o: torch.Tensor, w_o: Weight) -> torch.Tensor:
    """The attention's output projection: o (B, H, T, hd) → (B, T, D), the residual not yet added.
    Its own function so the attn group is released as soon as it is issued (see `Llama.forward`)."""
    b, _, t, _ = o.shape
    return linear(o.transpose(1, 2).reshape(b, t, -1), w_o)


def ffn(h: torch.Tensor, a: torch.Tensor, norm_w: torch.Tensor, w_gate_up: Weight, w_down: Weight,
        eps: float) -> torch.Tensor:
    """The attention residual, then the SwiGLU MLP over the packed gate|up projection + residual:
    h, a (B, T, D) → (B, T, D). The residual add starts this function so a compiled layer fuses it
    into the norm."""
    h = h + a
    gate, up = linear(rms_norm(h, norm_w, eps), w_gate_up).chunk(2, dim=-1)
    return h + linear(F.silu(gate) * up, w_down)


def head(h: torch.Tensor, norm_w: torch.Tensor, w: Weight, eps: float) -> torch.Tensor:
    """Final norm and the vocabulary projection: h (..., D) → logits (..., V)."""
    return linear(rms_norm(h, norm_w, eps), w)


QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


class Llama:
    def __init__(self, cfg: ModelConfig, weights: WeightSource, device: torch.device, compile: bool = False):
        self.cfg = cfg
        self.weights = weights
        self.freq = rope.inv_freq(cfg, device)
        # torch.compile fuses each layer's elementwise work (norms, RoPE, SwiGLU) into a few kernels:
        # at batch 1 a decode step is hundreds of tiny kernels otherwise. Every mode runs these same
        # compiled functions, so modes stay bit-identical to each other.
        wrap = compiled if compile else (lambda f: f)
        self.attn_in, self.attn_out, self.ffn = wrap(attn_in), wrap(attn_out), wrap(ffn)
        self.cos_sin, self.head = wrap(rope.cos_sin), wrap(head)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, step: Step, cache: KVCacheLike,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) → logits (B, V) at column `logits_at` (B,) of each row, or (B, T, V) if None."""
        c = self.cfg
        res = self.weights.resident()
        h = _embed(tokens, res["embed_tokens"])  # (B, T, D)
        cos, sin = self.cos_sin(self.freq, step.positions, h.dtype)
        for layer in range(c.num_hidden_layers):
            a = self.weights.wait(layer, "attn")
            q, k, v = self.attn_in(h, a["input_layernorm"], joined(a, "qkv_proj", QKV), cos, sin, c.rms_norm_eps,
                                   c.num_attention_heads, c.num_key_value_heads, c.head_dim)
            o = self.attn_out(cache.attend(layer, q, k, v, step), weight(a, "o_proj"))  # (B, T, D)
            self.weights.release(layer, "attn")
            f = self.weights.wait(layer, "ffn")
            h = self.ffn(h, o, f["post_attention_layernorm"], joined(f, "gate_up_proj", GATE_UP),
                         weight(f, "down_proj"), c.rms_norm_eps)
            self.weights.release(layer, "ffn")
        if logits_at is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_at]  # (B, D)
        w_head = weight(res, "lm_head") if has(res, "lm_head") else res["embed_tokens"]
        return self.head(h, res["norm"], w_head, c.rms_norm_eps)
