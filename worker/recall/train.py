"""Training the recall model: plain torch AdamW on HF `LlamaForCausalLM`, a curriculum over lengths.

The model is HF's own class, so what is trained is what is saved (`save_pretrained`, safetensors)
and what the engine must reproduce. The recipe is short on purpose: the model learns to find the
record and copy its value at short lengths, where steps are cheap (measured on one CPU core: solved
at 48 tokens within 200 steps), and later stages lengthen the context so the lookup survives
thousands of filler tokens. The loss is only on the answer tokens. Each stage ends with a greedy
accuracy check on fresh prompts (HF, exact attention), logged and returned, so a recipe that stops
learning says so. Several records per context (associative recall, which needs an induction circuit)
stayed at 1.0-1.6 nats per answer token after 2000-3000 steps here; the task supports it, the sizes
in `build` do not use it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from worker.recall.task import RecallTask, passkey_prompts, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """`steps` optimizer steps on rows of `length` tokens, `batch` rows per step."""

    length: int
    steps: int
    batch: int


@dataclass(frozen=True)
class Geometry:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int


@dataclass(frozen=True)
class TrainConfig:
    """One size of the recall model: geometry, task, curriculum and optimizer settings."""

    geometry: Geometry
    stages: tuple[Stage, ...]
    task: RecallTask = field(default_factory=RecallTask)
    queries: int = 4  # queries per training row
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    eval_prompts: int = 64
    bf16: bool = False  # autocast on CUDA
    # CPU threads while training: one makes a CPU rebuild bit-exact whatever the core count, and on a
    # shared machine it is the fast choice (measured: 0.125 s a step against 0.9 s with two threads,
    # whose every parallel region waits for the one the scheduler took away)
    cpu_threads: int = 1
    # RoPE base, with Llama 3.1's llama3 scaling on top. Both sizes use 10000 with heads of 64: more
    # channel pairs turn fast, so the previous-token head the task needs gets sharp sooner (measured on
    # a CPU at 300 steps: loss 1.95 against 2.21 with 500000, and 2.3 with heads of 32)
    rope_theta: float = 500000.0
    tied: bool = True  # lm_head = embeddings: copying a token is then the identity map, learned fastest

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: give at least one")
        for s in self.stages:
            if s.steps < 1 or s.batch < 1 or s.length < self.task.min_length():
                raise ValueError(f"stage {s}: steps, batch >= 1 and length >= {self.task.min_length()}")

    @property
    def max_length(self) -> int:
        return max(s.length for s in self.stages)

    def to_dict(self) -> dict:
        return asdict(self)


def hf_config(cfg: TrainConfig, max_positions: int):
    """The HF `LlamaConfig`: Llama 3.1's RoPE (llama3 scaling) on the small geometry."""
    from transformers import LlamaConfig

    v = cfg.task.vocab
    return LlamaConfig(
        vocab_size=v.size, **asdict(cfg.geometry), max_position_embeddings=max_positions,
        rms_norm_eps=1e-5, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tied, attention_bias=False,
        mlp_bias=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        bos_token_id=v.bos_id, eos_token_id=v.eos_id, torch_dtype="float32")


def _lr(step: int, total: int, last: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then a linear decay to a tenth over the last stage's `last` steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    into = step - (total - last)
    return cfg.lr if into < 0 else cfg.lr * (1 - 0.9 * into / last)


@torch.no_grad()
def greedy_accuracy(model, task: RecallTask, n: int, length: int, seed: int, device: torch.device,
                    batch: int = 16) -> float:
    """Passkey accuracy of an HF model with exact attention: greedy answers equal to the true ones.

    HF's generate builds a (rows, heads, length, length) score tensor at these lengths (a 4D mask
    sends SDPA to its math path): 16 rows at 32k asked the H200 for 256 GiB. Rows per call shrink
    with the square of the length beyond 2k, so the cpu size's stages (≤ 2k) evaluate as before."""
    prompts, answers = passkey_prompts(task, n, length, seed)
    batch = max(1, min(batch, batch * 2048 ** 2 // length ** 2))
    hits = 0
    for i in range(0, n, batch):
        ids = torch.tensor(prompts[i:i + batch], device=device)
        want = torch.tensor(answers[i:i + batch], device=device)
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=want.shape[1],
                             do_sample=False, pad_token_id=task.vocab.eos_id)[:, ids.shape[1]:]
        hits += int((got == want).all(1).sum())
    return hits / n


def train(cfg: TrainConfig, device: torch.device, max_positions: int) -> tuple[torch.nn.Module, list[dict]]:
    """Train from seed `cfg.seed`; returns the HF model (float32, eval mode) and a report per stage."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    try:
        return _train(cfg, device, max_positions)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, device: torch.device, max_positions: int) -> tuple[torch.nn.Module, list[dict]]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(hf_config(cfg, max_positions)).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    total, step, report = sum(s.steps for s in cfg.stages), 0, []
    t0 = time.perf_counter()
    for i, stage in enumerate(cfg.stages):
        model.train()
        losses = []
        for _ in range(stage.steps):
            b = sample(cfg.task, stage.batch, stage.length, cfg.queries, g)
            for group in opt.param_groups:
                group["lr"] = _lr(step, total, cfg.stages[-1].steps, cfg)
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda"):
                loss = model(input_ids=b.ids.to(device), labels=b.labels.to(device)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            losses.append(loss.item())
            step += 1
            if step % 50 == 0:
                log.info("step %d/%d (length %d): loss %.4f (%.0f s)", step, total, stage.length,
                         sum(losses[-50:]) / len(losses[-50:]), time.perf_counter() - t0)
        model.eval()
        acc = greedy_accuracy(model, cfg.task, cfg.eval_prompts, stage.length, 10_000 + i, device)
        report.append({"stage": i, "length": stage.length, "steps": stage.steps, "batch": stage.batch,
                       "loss": sum(losses[-20:]) / len(losses[-20:]), "exact_accuracy": acc,
                       "elapsed_s": round(time.perf_counter() - t0, 1)})
        log.info("stage %d (length %d, %d steps): loss %.4f, exact passkey accuracy %.3f (%.0f s)", i, stage.length,
                 stage.steps, report[-1]["loss"], acc, report[-1]["elapsed_s"])
    return model.float().eval(), report
