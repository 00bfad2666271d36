#!/bin/bash
# issue 13.2, warm: the engine's fill against the page cache read into fresh memory (cpu_fill.py's source_fresh:
# what a fill must do, first-touch page faults included), in one command on one machine. The 6-layer 70B
# checkpoint is made and packed first (a fresh machine); cpu_fill.py --cache warm reads it into the page cache and
# measures the sources and fills; then two fresh `bench run` processes of the 6-layer cpu point with
# --warm-page-cache (the first compiles and fills the host's caches, the second is the fresh process of a cached
# config: its setup phases and fill GB/s).
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/w
M=/tmp/sbg/llama3.1-70b-6L
timeout 240 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --repeats 2 \
    --variants pin1+huge pin2+huge --json $OUT/w/cpu_fill_warm.json > $OUT/w/cpu_fill_warm.log 2>&1
tail -n 30 $OUT/w/cpu_fill_warm.log
R="python3 -c 'import cli; cli.main()' -v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in 1 2 3; do
  timeout 150 bash -c "$R --out-json $OUT/w/run$i.json" > $OUT/w/run$i.log 2>&1
  python3 - $OUT/w/run$i.json <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); s = r["setup"]
keys = ("process", "imports", "tokenizer", "pack", "fill", "slots", "compile", "warmup", "probe")
before = sum(s.get(f"{k}_s") or 0 for k in keys)  # as setup_ab.py: every phase before the measured round
print(f"{sys.argv[1].split('/')[-1]}: before measuring {before:.2f} s; "
      + " ".join(f"{k} {s.get(k + '_s') or 0:.2f}" for k in keys)
      + f"; fill {s['fill_gbps'] or 0:.2f} GB/s, page cache {(s['fill_page_cache_bytes'] or 0) / 1e9:.2f} GB; "
      f"from cache {r['compile_cache']['compiled_from_cache']}; "
      f"decode {r['metrics']['decode_ms'] / r['metrics']['decode_steps']:.2f} ms/token; tokens {r['outputs'][0]['token_ids'][:8]}")
PY
done
