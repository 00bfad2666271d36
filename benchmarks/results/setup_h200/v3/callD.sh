#!/bin/bash
# issue 13: the 6-layer 70B cpu point's fresh processes once the host's caches are warm: the blob in the page
# cache (--warm-page-cache: run 1 leaves it there), compile cache and torch's bytecode (run 1 writes both);
# runs 2 and 4 keep the bytecode under the cache dir (default), run 3 with STREAMBENCH_BYTECODE_CACHE=0.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/w
M=/tmp/sbg/llama3.1-70b-6L
[ -f $M/config.json ] || python3 cli.py -v WARNING make-model $M --preset llama3.1-70b --layers 6
R="python3 -c 'import cli; cli.main()' -v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in 1 2 3 4; do
  [ $i = 3 ] && E="STREAMBENCH_BYTECODE_CACHE=0" || E=""
  env $E bash -c "$R --out-json $OUT/w/run$i.json" > $OUT/w/run$i.log 2>&1
  python3 - $OUT/w/run$i.json "$E" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); s = r["setup"]
keys = ("process", "imports", "tokenizer", "pack", "fill", "slots", "compile", "warmup", "probe")
before = sum(s.get(f"{k}_s") or 0 for k in keys)  # as setup_ab.py: every phase before the measured round
print(f"{sys.argv[1].split('/')[-1]} {sys.argv[2] or 'default'}: before measuring {before:.2f} s; "
      + " ".join(f"{k} {s.get(k + '_s') or 0:.2f}" for k in keys)
      + f"; fill {s['fill_gbps'] or 0:.2f} GB/s, page cache {(s['fill_page_cache_bytes'] or 0) / 1e9:.2f} GB; "
      f"compile_prepare {s['overlapped']['compile_prepare_s']}; from cache {r['compile_cache']['compiled_from_cache']}; "
      f"bytecode {s['bytecode']['prefix']}; decode {r['metrics']['decode_ms'] / r['metrics']['decode_steps']:.2f} ms/token; "
      f"tokens {r['outputs'][0]['token_ids'][:8]}")
print("   slots_parts", {k: round(v, 2) for k, v in s["slots_parts"].items() if isinstance(v, float) and v >= 0.05},
      "upload", s["slots_parts"]["upload"])
PY
done
