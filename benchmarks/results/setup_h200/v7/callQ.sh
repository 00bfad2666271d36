#!/bin/bash
# issue 13: the registrations off the reader threads now that the import is held:
# g the default (the reader completing a range registers it), p PIN_THREADS=2, u PIN_UNIT 1 GiB (12 calls, not 48),
# s PIN_UNIT 64 MiB (192 calls; page-cache requests of at most 64 MiB, so the last wave is shorter).
# each process reads its fill's extents from the page cache into fresh memory after the run (--source-after).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/q /tmp/h
M=/tmp/sbg/llama3.1-70b-6L
date -u +%H:%M:%S
[ -f $M/config.json ] || timeout 200 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --repeats 1 --variants pin0+huge > /tmp/h/cf.log 2>&1
A="-v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in ${ARMS:-w0 g1 p1 u1 s1 g2 p2 u2 s2 g3 p3 u3 s3 g4 p4 u4 s4}; do
  Y=""; X=""; [ ${i:0:1} = p ] && Y="--set worker.stream.fill:PIN_THREADS=2"; [ ${i:0:1} = u ] && Y="--set worker.stream.fill:PIN_UNIT=1073741824"; [ ${i:0:1} = s ] && Y="--set worker.stream.fill:PIN_UNIT=67108864"
  timeout 150 python3 benchmarks/fill_trace.py --source-after $Y cli $A $X --out-json /tmp/h/$i.json > /tmp/h/$i.log 2>&1 || tail -n 3 /tmp/h/$i.log
  python3 -c "
import json; r = json.load(open('/tmp/h/$i.json')); s = r['setup']; m = r['metrics']
keys = ('process', 'imports', 'tokenizer', 'pack', 'fill', 'slots', 'compile', 'warmup', 'probe')
print('$i', 'before measuring %.2f s;' % sum(s.get(k + '_s') or 0 for k in keys), ' '.join('%s %.2f' % (k, s.get(k + '_s') or 0) for k in keys),
      '; fill %.2f GB/s; context %.2f s; ahead import %s s; model build %.2f s;' % (s['fill_gbps'] or 0, s['overlapped'].get('cuda_context_s') or 0, s['overlapped'].get('compile_prepare_s'), s['slots_parts']['model_s'] or 0), 'decode %.2f ms/token' % (m['decode_ms'] / m['decode_steps']), r['outputs'][0]['token_ids'][:8])" | tee -a $OUT/q/runs.txt
  grep "TRACE" /tmp/h/$i.log | tee -a $OUT/q/runs.txt
done
date -u +%H:%M:%S
tar czf $OUT/q/arms.tgz -C /tmp/h $(cd /tmp/h && ls *.json *.log)
