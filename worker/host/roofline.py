"""The run's floor: the least time its bytes and FLOPs can take on this host, and how close it came.

Per pass (one forward over all layers) the placement fixes the bytes each tier must move: SSD reads
(groups homed on the SSD or refilled through the ring), H2D copies (every streamed group) and HBM
reads (every weight the compute touches once). Bytes are the manifest's, as packed: a quantized
pack's floor counts its quantized bytes, the bytes that really cross each link (the HBM term leaves
out the dequantized scratch weights the compute writes and reads back). With the host probe's measured bandwidths,
`floor = max(ssd_bytes / ssd_bw, h2d_bytes / pcie_bw, hbm_bytes / hbm_bw, flops / matmul_rate)`
and `attainment = floor / measured`. Terms whose bandwidth was not measured are left out, never guessed.
A decode step also moves KV bytes (read by the attention; fetched back when offloaded), passed in by
the engine's KV cache and added to the decode floor.

The SSD term of a run that reads the SSD uses the figure measured next to the run
(`worker.host.adjacent`) when there is one, the probe's cached figure otherwise; both are recorded.
An attainment above `SUSPECT_ATTAINMENT` means the floor's figures were too low for what the run
did, not that the engine beat the hardware: the run is marked `floor_suspect` and says so.
"""

from __future__ import annotations

from typing import Any

from worker.pack.groups import KINDS, RESIDENT, GroupKey
from worker.stream.plan import Placement
from worker.units import GB

SUSPECT_ATTAINMENT = 1.05  # above this, the floor is wrong (a noisy disk figure), not the run faster


def pass_bytes(manifest, placement: Placement) -> dict[str, int]:
    """Bytes per forward pass from each tier (the embedding table is gathered, not streamed through)."""
    ext = {g.name: g.nbytes for g in manifest.groups}
    ssd = h2d = 0
    for layer, home in enumerate(placement.home):
        size = sum(ext[GroupKey(layer, k).name] for k in KINDS)
        h2d += 0 if home == "gpu" else size
        ssd += size if home in ("ssd", "ring") else 0
    tensors: dict[str, int] = {}  # short name → bytes as packed (a quantized head: all its parts)
    for t in manifest.group_tensors(RESIDENT):
        base = t.short.split(".")[0]
        tensors[base] = tensors.get(base, 0) + t.nbytes
    head = tensors.get("lm_head", tensors["embed_tokens"]) + tensors["norm"]
    layers = sum(ext[GroupKey(i, k).name] for i in range(len(placement.home)) for k in KINDS)
    return {"ssd": ssd, "h2d": h2d, "hbm": layers + head}


def flops(cfg, tokens: int, context: int) -> float:
    """Matmul FLOPs of one pass over `tokens` new tokens attending to `context` positions on average."""
    h, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    per_token_layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * f) + 4 * context * cfg.num_attention_heads * cfg.head_dim
    return tokens * (cfg.num_hidden_layers * per_token_layer + 2 * h * cfg.vocab_size)


def floor_s(nbytes: dict[str, int], fl: float, probe: dict[str, Any]) -> tuple[float | None, str | None]:
    terms = {
        "ssd": (nbytes["ssd"], probe.get("ssd_gbps")),
        "h2d": (nbytes["h2d"], probe.get("h2d_gbps")),
        "hbm": (nbytes["hbm"], probe.get("hbm_gbps")),
    }
    times = {k: b / (bw * GB) for k, (b, bw) in terms.items() if b and bw}
    if probe.get("matmul_tflops"):
        times["compute"] = fl / (probe["matmul_tflops"] * 1e12)
    if not times:
        return None, None
    bound = max(times, key=times.get)
    return times[bound], bound


def roofline(manifest, placement: Placement, probe: dict[str, Any] | None, batch: int, prompt_len: int,
             prefill_ms: float, decode_ms: float, decode_steps: int,
             credit: dict[str, int] | None = None, kv_step: dict[str, int] | None = None,
             ssd_gbps: float | None = None) -> dict[str, Any] | None:
    """`credit`: bytes the streamer had already fetched when the measured round began; the prefill
    did not have to move them, so its floor leaves them out (decode is steady state: no credit).
    `kv_step`: KV bytes one decode step moves per tier (HBM reads by the attention, offloaded blocks
    fetched H2D, SSD spill traffic), added to the decode floor's weight bytes.
    `ssd_gbps`: the SSD rate measured next to the run (worker.host.adjacent); it replaces the probe's
    in the SSD term. `ssd_gbps` in the result stays the probe's; `floor_ssd_gbps` is what the floor used
    (None when the run reads nothing from the SSD)."""
    if not probe:
        return None
    cfg = manifest.model_config
    nb = pass_bytes(manifest, placement)
    credit = credit or {}
    nb_prefill = {k: max(0, v - credit.get(k, 0)) for k, v in nb.items()}
    nb_decode = {k: v + (kv_step or {}).get(k, 0) for k, v in nb.items()}
    rates = {**probe, "ssd_gbps": ssd_gbps} if ssd_gbps else probe
    fp, bound_p = floor_s(nb_prefill, flops(cfg, batch * prompt_len, prompt_len // 2), rates)
    fd, bound_d = floor_s(nb_decode, flops(cfg, batch, prompt_len + decode_steps // 2), rates)
    per_token_s = decode_ms / 1e3 / decode_steps if decode_steps else None
    att_p = fp / (prefill_ms / 1e3) if fp and prefill_ms else None
    att_d = fd / per_token_s if fd and per_token_s else None
    return {
        "ssd_gbps": probe.get("ssd_gbps"), "h2d_gbps": probe.get("h2d_gbps"), "hbm_gbps": probe.get("hbm_gbps"),
        "matmul_tflops": probe.get("matmul_tflops"), "probe_measured_at": probe.get("measured_at"),
        "floor_ssd_gbps": rates.get("ssd_gbps") if nb["ssd"] else None,
        "floor_ssd_source": ("adjacent" if ssd_gbps else "probe") if nb["ssd"] else None,
        "pass_bytes": nb, "prefill_prefetched_bytes": credit, "kv_step_bytes": kv_step,
        "floor_prefill_s": fp, "bound_prefill": bound_p,
        "floor_decode_s": fd, "bound_decode": bound_d,
        "attainment_prefill": att_p, "attainment_decode": att_d,
        "floor_suspect": suspect(att_p, att_d),
    }


def suspect(*attainments: float | None) -> bool:
    """Whether any attainment is above SUSPECT_ATTAINMENT (the floor's figures, not the run, are off)."""
    return any(a is not None and a > SUSPECT_ATTAINMENT for a in attainments)


def suspect_warning(roof: dict[str, Any]) -> str:
    """The run JSON's warning for a suspect floor: which attainment, and the figures the floor used."""
    over = ", ".join(f"{k} {roof[f'attainment_{k}']:.2f}" for k in ("prefill", "decode")
                     if (roof.get(f"attainment_{k}") or 0) > SUSPECT_ATTAINMENT)
    ssd = roof.get("floor_ssd_gbps")
    probe = roof.get("ssd_gbps")
    disk = (f"; the floor's SSD figure was {ssd:.3g} GB/s ({roof.get('floor_ssd_source')}; the probe's "
            f"{'none' if probe is None else f'{probe:.3g}'})" if ssd else "")
    return (f"floor_suspect: attainment {over} is above {SUSPECT_ATTAINMENT}: the floor's bandwidth figures "
            f"were lower than what the run moved, so its attainment does not say the engine beat the hardware{disk}")
