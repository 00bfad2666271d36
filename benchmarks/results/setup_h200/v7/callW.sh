#!/bin/bash
# issue 13, NOT RUN YET (for the next lease, after callV.sh): the fill's first tenth (U: about half the threads reading).
# k the default, a MAP_AHEAD=2 (two groups mapped before the first read and split over the threads, so none waits
# for the second group's map). Alternating (if V's winner became the default, both arms have it).
# each process reads its fill's extents from the page cache into fresh memory after the run (--source-after).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/w /tmp/h
M=/tmp/sbg/llama3.1-70b-6L
date -u +%H:%M:%S
[ -f $M/config.json ] || timeout 200 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --repeats 1 --variants pin0+huge > /tmp/h/cf.log 2>&1
A="-v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in ${ARMS:-w0 k1 a1 k2 a2 k3 a3 k4 a4 k5 a5 k6 a6}; do
  Y=""; X=""; [ ${i:0:1} = a ] && Y="--set worker.stream.fill:MAP_AHEAD=2"
  timeout 75 python3 benchmarks/fill_trace.py --source-after --json /tmp/h/$i.trace.json $Y cli $A $X --out-json /tmp/h/$i.json > /tmp/h/$i.log 2>&1 || tail -n 3 /tmp/h/$i.log
  python3 -c "
import json; r = json.load(open('/tmp/h/$i.json')); s = r['setup']; m = r['metrics']
keys = ('process', 'imports', 'tokenizer', 'pack', 'fill', 'slots', 'compile', 'warmup', 'probe')
print('$i', 'before measuring %.2f s;' % sum(s.get(k + '_s') or 0 for k in keys), ' '.join('%s %.2f' % (k, s.get(k + '_s') or 0) for k in keys),
      '; fill %.2f GB/s; context %.2f s; ahead import %s s; model build %.2f s;' % (s['fill_gbps'] or 0, s['overlapped'].get('cuda_context_s') or 0, s['overlapped'].get('compile_prepare_s'), s['slots_parts']['model_s'] or 0), 'decode %.2f ms/token' % (m['decode_ms'] / m['decode_steps']), r['outputs'][0]['token_ids'][:8])" | tee -a $OUT/w/runs.txt
  grep "TRACE" /tmp/h/$i.log | tee -a $OUT/w/runs.txt
done
date -u +%H:%M:%S
tar czf $OUT/w/arms.tgz -C /tmp/h $(cd /tmp/h && ls *.json *.log)
