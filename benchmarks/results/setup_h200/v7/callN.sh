#!/bin/bash
# issue 13, after callM: the engine as committed (CUDA context made early; Python's switch interval) with and
# without the compile-ahead import beside the fill (x: --no-compile-ahead), each process also reading its fill's
# extents from the page cache into fresh memory after the run (fill_trace.py --source-after: the source, same process).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/n /tmp/h
M=/tmp/sbg/llama3.1-70b-6L
date -u +%H:%M:%S
[ -f $M/config.json ] || timeout 200 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --repeats 1 --variants pin0+huge > /tmp/h/cf.log 2>&1
A="-v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in ${ARMS:-w0 a1 x1 a2 x2 a3 x3 a4 x4}; do
  X=""; [ ${i:0:1} = x ] && X="--no-compile-ahead"
  timeout 150 python3 benchmarks/fill_trace.py --source-after cli $A $X --out-json /tmp/h/$i.json > /tmp/h/$i.log 2>&1 || tail -n 3 /tmp/h/$i.log
  python3 -c "
import json; r = json.load(open('/tmp/h/$i.json')); s = r['setup']; m = r['metrics']
keys = ('process', 'imports', 'tokenizer', 'pack', 'fill', 'slots', 'compile', 'warmup', 'probe')
print('$i', 'before measuring %.2f s;' % sum(s.get(k + '_s') or 0 for k in keys), ' '.join('%s %.2f' % (k, s.get(k + '_s') or 0) for k in keys),
      '; fill %.2f GB/s; context %s;' % (s['fill_gbps'] or 0, s['overlapped'].get('cuda_context_s')), 'decode %.2f ms/token' % (m['decode_ms'] / m['decode_steps']), r['outputs'][0]['token_ids'][:8])" | tee -a $OUT/n/runs.txt
  grep "TRACE" /tmp/h/$i.log | tee -a $OUT/n/runs.txt
done
date -u +%H:%M:%S
