#!/bin/bash
# issue 13: is the run's first cudaHostRegister making the CUDA context while the other readers wait behind it (callK:
# pins' wall 2.3-3.7 s on 0.4-0.5 s of CPU and ~5000 page faults in a run, 0.6 s / 31 faults in cpu_fill.py, whose
# source() registers before timing)? Traced runs (t) against traced runs with the context made first (c), alternating.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/l /tmp/h
M=/tmp/sbg/llama3.1-70b-6L
date -u +%H:%M:%S
[ -f $M/config.json ] || timeout 200 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --repeats 1 --variants pin0+huge > $OUT/l/cpu_fill.log 2>&1
grep -E "source: into|new:" $OUT/l/cpu_fill.log | tee -a $OUT/l/runs.txt
A="-v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in ${ARMS:-w0 t1 c1 t2 c2 t3 c3}; do
  X=""; [ ${i:0:1} = c ] && X="--context-first"
  timeout 150 python3 benchmarks/fill_trace.py $X cli $A --out-json /tmp/h/$i.json > /tmp/h/$i.log 2>&1 || tail -n 3 /tmp/h/$i.log
  python3 -c "
import json; r = json.load(open('/tmp/h/$i.json')); s = r['setup']; m = r['metrics']
keys = ('process', 'imports', 'tokenizer', 'pack', 'fill', 'slots', 'compile', 'warmup', 'probe')
print('$i', 'before measuring %.2f s;' % sum(s.get(k + '_s') or 0 for k in keys), ' '.join('%s %.2f' % (k, s.get(k + '_s') or 0) for k in keys),
      '; fill %.2f GB/s;' % (s['fill_gbps'] or 0), 'decode %.2f ms/token' % (m['decode_ms'] / m['decode_steps']), r['outputs'][0]['token_ids'][:8])" | tee -a $OUT/l/runs.txt
  grep "TRACE" /tmp/h/$i.log | tee -a $OUT/l/runs.txt
done
date -u +%H:%M:%S
