#!/bin/bash
# issue 13, NOT RUN YET (for the next lease): the registrations queued at the fill's end (U: 3-4 ranges of 256 MiB still to register
# when the last read ends, 15-30 ms of a 420 ms fill). Units complete in waves while 16 requests of 128 MiB span 8 of them;
# smaller page-cache requests make them complete one after the other. k the default, c CACHED_READ 32 MiB, s 16 MiB,
# d two registration slots (PIN_SLOTS=2). Alternating.
# each process reads its fill's extents from the page cache into fresh memory after the run (--source-after).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/v /tmp/h
M=/tmp/sbg/llama3.1-70b-6L
date -u +%H:%M:%S
[ -f $M/config.json ] || timeout 200 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --repeats 1 --variants pin0+huge > /tmp/h/cf.log 2>&1
A="-v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in ${ARMS:-w0 k1 c1 s1 d1 k2 c2 s2 d2 k3 c3 s3 d3 k4 c4 s4 d4}; do
  Y=""; X=""; [ ${i:0:1} = c ] && Y="--set worker.stream.fill:CACHED_READ=33554432"; [ ${i:0:1} = s ] && Y="--set worker.stream.fill:CACHED_READ=16777216"; [ ${i:0:1} = d ] && Y="--set worker.stream.fill:PIN_SLOTS=2"
  timeout 75 python3 benchmarks/fill_trace.py --source-after --json /tmp/h/$i.trace.json $Y cli $A $X --out-json /tmp/h/$i.json > /tmp/h/$i.log 2>&1 || tail -n 3 /tmp/h/$i.log
  python3 -c "
import json; r = json.load(open('/tmp/h/$i.json')); s = r['setup']; m = r['metrics']
keys = ('process', 'imports', 'tokenizer', 'pack', 'fill', 'slots', 'compile', 'warmup', 'probe')
print('$i', 'before measuring %.2f s;' % sum(s.get(k + '_s') or 0 for k in keys), ' '.join('%s %.2f' % (k, s.get(k + '_s') or 0) for k in keys),
      '; fill %.2f GB/s; context %.2f s; ahead import %s s; model build %.2f s;' % (s['fill_gbps'] or 0, s['overlapped'].get('cuda_context_s') or 0, s['overlapped'].get('compile_prepare_s'), s['slots_parts']['model_s'] or 0), 'decode %.2f ms/token' % (m['decode_ms'] / m['decode_steps']), r['outputs'][0]['token_ids'][:8])" | tee -a $OUT/v/runs.txt
  grep "TRACE" /tmp/h/$i.log | tee -a $OUT/v/runs.txt
done
date -u +%H:%M:%S
tar czf $OUT/v/arms.tgz -C /tmp/h $(cd /tmp/h && ls *.json *.log)
