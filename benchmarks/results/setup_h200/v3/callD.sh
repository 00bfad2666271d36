#!/bin/bash
# issue 13, for the next session with device time (not run yet). The 6-layer 70B cpu point:
# 1. fresh processes on a cold disk, --fill-behind against the default (setup_ab.py pairs: the compile from the
#    cache overlapping the fill's reads?);
# 2. fresh processes once the host's caches are warm: the blob in the page cache (--warm-page-cache: run 1 leaves
#    it there), compile cache and torch's bytecode (run 1 writes both); runs 2 and 4 as configured by default,
#    run 3 with STREAMBENCH_BYTECODE_CACHE=0, run 5 with --fill-behind.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/w
M=/tmp/sbg/llama3.1-70b-6L
timeout 300 python3 benchmarks/setup_ab.py --work /tmp/sbg --json $OUT/w/fill_behind.json --pairs 2 \
    --flag=--fill-behind --base-flag > $OUT/w/fill_behind.log 2>&1
tail -n 8 $OUT/w/fill_behind.log
R="python3 -c 'import cli; cli.main()' -v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in 1 2 3 4 5; do
  E=""; F=""
  [ $i = 3 ] && E="STREAMBENCH_BYTECODE_CACHE=0"
  [ $i = 5 ] && F="--fill-behind"
  env $E bash -c "$R $F --out-json $OUT/w/run$i.json" > $OUT/w/run$i.log 2>&1
  python3 - $OUT/w/run$i.json "$E $F" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); s = r["setup"]
keys = ("process", "imports", "tokenizer", "pack", "fill", "slots", "compile", "warmup", "probe")
before = sum(s.get(f"{k}_s") or 0 for k in keys)  # as setup_ab.py: every phase before the measured round
print(f"{sys.argv[1].split('/')[-1]} {sys.argv[2].strip() or 'default'}: before measuring {before:.2f} s; "
      + " ".join(f"{k} {s.get(k + '_s') or 0:.2f}" for k in keys)
      + f"; fill {s['fill_gbps'] or 0:.2f} GB/s, page cache {(s['fill_page_cache_bytes'] or 0) / 1e9:.2f} GB; "
      f"overlapped {s['overlapped']}; from cache {r['compile_cache']['compiled_from_cache']}; "
      f"bytecode {s['bytecode']['prefix']}; decode {r['metrics']['decode_ms'] / r['metrics']['decode_steps']:.2f} ms/token; "
      f"tokens {r['outputs'][0]['token_ids'][:8]}")
print("   slots_parts", {k: round(v, 2) for k, v in s["slots_parts"].items() if isinstance(v, float) and v >= 0.05},
      "upload", s["slots_parts"]["upload"])
PY
done
