#!/bin/bash
# issue 13, NOT RUN YET (for a later lease): the compile phase of a warm fresh process (2.3-3.8 s in Q-U; how much of it is Dynamo tracing
# the model again in every process is not split yet) with torch's Dynamo precompile cache (torch._dynamo.config.caching_precompile, read
# from TORCH_CACHING_PRECOMPILE in the CPU VM's torch 2.13: check the device's 2.11 first; its artifacts under the inductor
# cache dir, which worker.model.compile_cache keys by commit and torch, not by this flag: key it before making it a default).
# k the default, p TORCH_CACHING_PRECOMPILE=1 (p0 populates it). Same tokens required in every process.
# each process reads its fill's extents from the page cache into fresh memory after the run (--source-after).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/x /tmp/h
M=/tmp/sbg/llama3.1-70b-6L
date -u +%H:%M:%S
[ -f $M/config.json ] || timeout 200 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --repeats 1 --variants pin0+huge > /tmp/h/cf.log 2>&1
A="-v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in ${ARMS:-w0 p0 k1 p1 k2 p2 k3 p3 k4 p4 k5 p5}; do
  Y=""; X=""; E=""; [ ${i:0:1} = p ] && E="TORCH_CACHING_PRECOMPILE=1"
  env $E timeout 75 python3 benchmarks/fill_trace.py --source-after --json /tmp/h/$i.trace.json $Y cli $A $X --out-json /tmp/h/$i.json > /tmp/h/$i.log 2>&1 || tail -n 3 /tmp/h/$i.log
  python3 -c "
import json; r = json.load(open('/tmp/h/$i.json')); s = r['setup']; m = r['metrics']
keys = ('process', 'imports', 'tokenizer', 'pack', 'fill', 'slots', 'compile', 'warmup', 'probe')
print('$i', 'before measuring %.2f s;' % sum(s.get(k + '_s') or 0 for k in keys), ' '.join('%s %.2f' % (k, s.get(k + '_s') or 0) for k in keys),
      '; fill %.2f GB/s; context %.2f s; ahead import %s s; model build %.2f s;' % (s['fill_gbps'] or 0, s['overlapped'].get('cuda_context_s') or 0, s['overlapped'].get('compile_prepare_s'), s['slots_parts']['model_s'] or 0), 'decode %.2f ms/token' % (m['decode_ms'] / m['decode_steps']), r['outputs'][0]['token_ids'][:8])" | tee -a $OUT/x/runs.txt
  grep "TRACE" /tmp/h/$i.log | tee -a $OUT/x/runs.txt
done
date -u +%H:%M:%S
tar czf $OUT/x/arms.tgz -C /tmp/h $(cd /tmp/h && ls *.json *.log)
