"""What each weight format costs in accuracy: `bench run --accuracy-ref native` on the synthetic and trained presets.

Every format (int8, int4, fp8) runs through `worker.run.run` with `accuracy_ref: native`, so the
figures are the ones a run's JSON and row carry: teacher-forced top-1 agreement with the native
weights and mean KL(native || quantized) over the generated positions. Two models:

- `tiny` (random weights, the preset's geometry and real 128256-word vocabulary, float32, 128-token
  synthesized prompts, 32 generated tokens, batch 4, int4 in groups of 16): random weights give near-uniform next-token
  distributions where a small logit error flips the argmax, so this is a lower bound;
- `recall` (the committed trained checkpoint, float32): passkey prompts of 512 tokens, 4 generated
  tokens each (the answer), 32 rows; it also reports how many passkeys each format still retrieves.

Float32 compute, so the gap is the quantization's, not bf16 rounding's. Runs on the CPU:

    python benchmarks/accuracy_cpu.py --work /tmp/acc | tee benchmarks/results/accuracy_cpu.txt
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from worker.recall.build import copy_reference
from worker.recall.passkey import run_passkeys, write_passkeys
from worker.run import resolve_config, run
from worker.synth.checkpoints import make_model

FORMATS = ("int8", "int4", "fp8")
TINY_GROUP = 16  # tiny's intermediate size 688 is no multiple of 128; recall's (256) is: it keeps 128


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the reference's load bar, once per run, in the committed output
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="scratch directory (checkpoints, packs, JSONs)")
    a = p.parse_args(argv)
    print("$ python benchmarks/accuracy_cpu.py " + " ".join(sys.argv[1:]), flush=True)
    print(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}", flush=True)
    a.work.mkdir(parents=True, exist_ok=True)
    tiny = a.work / "tiny"
    if not tiny.exists():
        make_model(tiny, preset="tiny", dtype="float32", seed=0)
    recall = a.work / "recall"
    if not recall.exists():
        copy_reference(recall)
    keys = write_passkeys(recall, 32, 512, seed=512, path=a.work / "passkeys.txt")
    base = {"mode": "gpu", "device": "cpu", "temperature": 0.0, "roofline": False, "warmup_rounds": 0,
            "pack_dir": str(a.work / "packs")}
    print("\n| model | format | positions | top-1 agreement | mean KL (nats) | passkeys right | decode ms/token |")
    print("|---|---|---|---|---|---|---|")
    native = run_passkeys(recall, keys, {}, **base, out_json=str(a.work / "recall-native.json"))
    print(f"| recall (trained) | native | — | — | — | {native['accuracy']:.3f} | "
          f"{native['result']['metrics']['decode_ms'] / max(1, native['result']['metrics']['decode_steps']):.2f} |",
          flush=True)
    for fmt in FORMATS:
        t0 = time.perf_counter()
        r = run(resolve_config({**base, "checkpoints": str(tiny), "prompt_len": 128, "max_new_tokens": 32,
                                "batch_size": 4, "weight_format": fmt, "accuracy_ref": "native",
                                "quant_group_size": TINY_GROUP,
                                "out_json": str(a.work / f"tiny-{fmt}.json")}))
        _row("tiny (random)", fmt, r, "—", time.perf_counter() - t0)
    for fmt in FORMATS:
        t0 = time.perf_counter()
        out = run_passkeys(recall, keys, {}, **base, weight_format=fmt, accuracy_ref="native",
                           out_json=str(a.work / f"recall-{fmt}.json"))
        _row("recall (trained)", fmt, out["result"], f"{out['accuracy']:.3f}", time.perf_counter() - t0)
    return 0


def _row(model: str, fmt: str, r: dict, passkeys: str, seconds: float) -> None:
    acc, m = r["accuracy"], r["metrics"]
    step = m["decode_ms"] / m["decode_steps"] if m["decode_steps"] else float("nan")
    print(f"| {model} | {fmt} | {acc['positions']} | {acc['top1_agreement']:.4f} | {acc['mean_kl']:.2e} | "
          f"{passkeys} | {step:.2f} |", flush=True)
    logging.getLogger("accuracy_cpu").info("%s %s took %.1f s", model, fmt, seconds)


if __name__ == "__main__":
    sys.exit(main())
