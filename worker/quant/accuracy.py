"""Accuracy next to speed: how far a quantized run's next-token distributions are from the native weights'.

A quantized format is faster because it computes a different function; a speed-up is only worth
reading next to what it costs. `bench run --accuracy-ref native` measures that cost on the run's own
prompt and tokens: teacher forcing feeds prompt + generated tokens once through the run's quantized
engine and once through HF transformers' `LlamaForCausalLM` on the native checkpoint (the reference
the engine equals within 1e-5 in float32, `tests/test_engine_hf.py`), both in the run's compute
dtype on the run's device, and compares the two at every generated position: the share of positions
whose argmax agrees, and the mean KL(native || quantized) in nats. Teacher forcing scores every
position against the same context, so one early disagreement does not make every later token
"wrong", and sampling (temperature > 0) does not change what is compared.

It runs after the measured round and after the result's numbers are taken from it (`worker.run`),
in its own setup phase (`accuracy`): it must not change any measured number, and it does not. The
native reference is loaded resident on the run's device next to the engine, so the check is for
models whose native weights fit there too; a reference that does not fit leaves the run's result
with a warning instead of losing it. Random-weight presets give near-uniform distributions, where
small logit errors flip many argmaxes: their agreement is a lower bound, a trained model's (the
`recall` preset) is the meaningful figure.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from worker.errors import UserError
from worker.model.step import Step

log = logging.getLogger(__name__)


def check_reference(checkpoints: str) -> None:
    """Before any work: a pre-quantized checkpoint has no native weights to compare with."""
    cfg = Path(checkpoints) / "config.json"
    if cfg.is_file() and "quantization_config" in json.loads(cfg.read_text()):
        raise UserError(f"--accuracy-ref native needs native weights, and {checkpoints} is a pre-quantized "
                        "checkpoint (config.json has quantization_config); compare on its source checkpoint")


def divergence(ref: torch.Tensor, got: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position (rows of (N, V) logits): KL(softmax(ref) || softmax(got)) in nats, in float32, and
    whether the argmaxes agree (ties go to the lowest token id, as torch.argmax breaks them)."""
    p, q = torch.log_softmax(ref.float(), -1), torch.log_softmax(got.float(), -1)
    return (p.exp() * (p - q)).sum(-1), ref.argmax(-1) == got.argmax(-1)


def summarize(ref: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    kl, agree = divergence(ref, got)
    n = int(kl.numel())
    return {"positions": n, "top1_agreement": float(agree.float().mean()) if n else None,
            "mean_kl": float(kl.mean()) if n else None}


def teacher_forced(forward, prompt_ids: list[list[int]], token_ids: list[list[int]],
                   device: torch.device) -> torch.Tensor:
    """`forward(ids (1, T)) -> logits (1, T, V)` over each row's prompt + generated tokens (the last one
    is never fed: nothing is generated after it); the logits that predicted each generated token,
    every row's in turn, (N, V) float32 on the host. Row by row: no padding to get wrong."""
    out = []
    for prompt, gen in zip(prompt_ids, token_ids):
        if not gen:
            continue
        seq = torch.tensor([prompt + gen[:-1]], device=device)
        with torch.no_grad():
            logits = forward(seq)
        out.append(logits[0, len(prompt) - 1:].float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def engine_forward(engine, capacity: int, device: torch.device):
    """The engine's own prefill on a fresh cache: the quantized weights exactly as the run computed them
    (the same weight source, dequantization and kernels)."""
    def forward(ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        step = Step(torch.arange(t, device=device).expand(1, t), t, (t,))
        return engine.model.forward(ids, step, engine.new_cache(1, capacity))
    return forward


def native_model(checkpoints: str, dtype: torch.dtype, device: torch.device):
    """HF on the native checkpoint, resident, from local safetensors only (never a download)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(checkpoints, dtype=dtype, use_safetensors=True,
                                            local_files_only=True).to(device).eval()


def measure_accuracy(engine, checkpoints: str, prompt_ids: list[list[int]], token_ids: list[list[int]],
                     capacity: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """The run JSON's `accuracy` section: ref, positions, top1_agreement, mean_kl (and the seconds it took)."""
    t0 = time.perf_counter()
    got = teacher_forced(engine_forward(engine, capacity, device), prompt_ids, token_ids, device)
    hf = native_model(checkpoints, dtype, device)
    try:
        ref = teacher_forced(lambda ids: hf(ids).logits, prompt_ids, token_ids, device)
    finally:
        del hf  # the engine's memory is the run's: the reference's goes back at once
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = {"ref": "native", "dtype": str(dtype).removeprefix("torch."), **summarize(ref, got),
           "seconds": time.perf_counter() - t0}
    log.info("accuracy vs native: top-1 agreement %.4f, mean KL %.3g nats over %d positions",
             out["top1_agreement"] or 0.0, out["mean_kl"] or 0.0, out["positions"])
    return out
