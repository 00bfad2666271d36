#!/bin/bash
# issue 13: this commit's defaults (d: the reader thread that completes a range registers it, PIN_THREADS 0, and the
# collector paused in the rounds, gc_freeze on) against the defaults before 429e3d6 (p: PIN_THREADS 1 injected,
# --no-gc-freeze), fresh `bench run` processes of the 6-layer 70B cpu point with --warm-page-cache after an untimed
# first one (w0), alternating, every arm started the same way (python3 -c, the gc.callbacks hook of callI.sh);
# cpu_fill.py first (it makes the checkpoint on a fresh machine; its source is the in-run fill's reference).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/w /tmp/h
M=/tmp/sbg/llama3.1-70b-6L
date -u +%H:%M:%S
timeout 200 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --repeats 1 --variants pin1+huge pin0+huge \
  --json $OUT/w/cpu_fill_warm.json > $OUT/w/cpu_fill_warm.log 2>&1
grep -E "source|new|median" $OUT/w/cpu_fill_warm.log | tail -n 8
date -u +%H:%M:%S
A="-v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
HOOK="import gc, time, sys, atexit
T0 = time.perf_counter(); S = {}; L = []
def cb(phase, info):
    if phase == 'start':
        S['t'] = time.perf_counter()
    elif time.perf_counter() - S['t'] > 0.02:
        L.append((info['generation'], round((time.perf_counter() - S['t']) * 1000), round(S['t'] - T0, 2)))
gc.callbacks.append(cb)
atexit.register(lambda: print('GC>20ms', L, file=sys.stderr))
from worker.stream import fill as F"
for i in w0 d1 p1 d2 p2 d3 p3 d4 p4; do
  P="$HOOK"; X=""
  [ ${i:0:1} = p ] && P="$P; F.PIN_THREADS = 1" && X="--no-gc-freeze"
  timeout 150 python3 -c "$P
import cli; cli.main()" $A $X --out-json /tmp/h/$i.json > /tmp/h/$i.log 2>&1 || tail -n 3 /tmp/h/$i.log
  python3 -c "
import json; r = json.load(open('/tmp/h/$i.json')); s = r['setup']; m = r['metrics']
keys = ('process', 'imports', 'tokenizer', 'pack', 'fill', 'slots', 'compile', 'warmup', 'probe')
print('$i', 'before measuring %.2f s;' % sum(s.get(k + '_s') or 0 for k in keys), ' '.join('%s %.2f' % (k, s.get(k + '_s') or 0) for k in keys),
      '; fill %.2f GB/s;' % (s['fill_gbps'] or 0), 'measure %.2f s (wall %.2f);' % (s['measure_s'], s['wall_s']),
      'decode %.2f ms/token, itl p50 %.1f p90 %.1f p99 %.1f' % (m['decode_ms'] / m['decode_steps'], m['itl_p50_ms'], m['itl_p90_ms'], m['itl_p99_ms']),
      r['outputs'][0]['token_ids'][:8])" | tee -a $OUT/w/runs.txt
  grep "GC>20ms" /tmp/h/$i.log | tee -a $OUT/w/runs.txt
done
cp /tmp/h/d1.json /tmp/h/p1.json /tmp/h/d1.log $OUT/w/
date -u +%H:%M:%S
