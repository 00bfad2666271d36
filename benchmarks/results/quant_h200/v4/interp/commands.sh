#!/usr/bin/env bash
# issue 17, int4 batch 16 in cpu mode: where the copy stream idles, and whether the interpreter's pauses are it
set -u
W=/tmp/sbq; C=$W/llama3.1-70b-2L; O=$OUT/f; mkdir -p $O
git log --oneline -1
SP="python3 benchmarks/stream_profile.py --work $W --layers 2 --batch 16 --formats int4"
timeout 150 $SP --json $O/sp_default.json 2>&1 | grep -v -i warn | tee $O/sp_default.log | grep -v "^\s*$"
timeout 60 $SP --gc-freeze --json $O/sp_gc.json 2>&1 | grep -v -i warn | tee $O/sp_gc.log | grep "ms/step\|idle between\|fetch\."
timeout 60 $SP --switch-interval-us 200 --json $O/sp_si.json 2>&1 | grep -v -i warn | tee $O/sp_si.log | grep "ms/step\|idle between\|fetch\."
run() {  # name, extra flags
  local name=$1; shift
  timeout 70 python3 -c 'import cli; cli.main()' run --checkpoints $C --mode cpu --batch-size 16 --prompt-len 512 \
    --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 15.032 --out-json $O/$name.json "$@" > $O/$name.log 2>&1
  python3 - $O/$name.json $name <<'P'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print(sys.argv[2], "FAILED", e); sys.exit()
m, r = d["metrics"], d.get("roofline") or {}
print(f"{sys.argv[2]:22} ms/token {m['decode_ms'] / m['decode_steps']:7.2f}  p50 {m['itl_p50_ms']:6.2f}  "
      f"attain {r.get('attainment_decode')}  tokens {d['outputs'][0]['token_ids'][:4]}", flush=True)
P
}
Q="--weight-format int4 --quant-group-size 128"
B="--gc-freeze --switch-interval-us 200"
run int4_default $Q; run int4_gc $Q --gc-freeze; run int4_si $Q --switch-interval-us 200; run int4_both $Q $B
run native_default; run native_both $B
[ $SECONDS -lt 360 ] && { run int4_default_2 $Q; run int4_both_2 $Q $B; }
[ $SECONDS -lt 390 ] && { run native_default_2; run native_both_2 $B; }
echo "done in $SECONDS s"
