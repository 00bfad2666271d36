#!/bin/bash
# issue 13: where the fill's time goes inside a fresh `bench run` against cpu_fill.py's (benchmarks/fill_trace.py:
# every read and registration timed on its thread with its CPU time, page faults and context switches; per fill,
# the process's threads' CPU, /proc/stat and /proc/vmstat). Traced processes set up the bytecode cache first as
# cli.py does (setup_v5's H-J hooks imported torch before cli, so they ran without it). Plain processes (b) are
# what a user runs: their setup is the <= 10 s figure.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/k /tmp/h
M=/tmp/sbg/llama3.1-70b-6L
date -u +%H:%M:%S; nproc; uname -r; cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag
timeout 240 python3 benchmarks/fill_trace.py --json $OUT/k/trace_cpu_fill.json script benchmarks/cpu_fill.py --work /tmp/sbg \
  --layers 6 --cache warm --repeats 2 --variants pin0+huge > $OUT/k/cpu_fill.log 2>&1
grep -E "source: into|new:|median|TRACE" $OUT/k/cpu_fill.log | tee -a $OUT/k/runs.txt
date -u +%H:%M:%S
A="-v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in w0 t1 b1 x1 t2 b2 x2 t3 b3; do
  case ${i:0:1} in
    w|b) C="python3 cli.py $A";;
    t) C="python3 benchmarks/fill_trace.py --json /tmp/h/$i.trace.json cli $A";;
    x) C="python3 benchmarks/fill_trace.py --json /tmp/h/$i.trace.json cli $A --no-compile-ahead";;
  esac
  timeout 150 $C --out-json /tmp/h/$i.json > /tmp/h/$i.log 2>&1 || tail -n 3 /tmp/h/$i.log
  python3 -c "
import json; r = json.load(open('/tmp/h/$i.json')); s = r['setup']; m = r['metrics']
keys = ('process', 'imports', 'tokenizer', 'pack', 'fill', 'slots', 'compile', 'warmup', 'probe')
print('$i', 'before measuring %.2f s;' % sum(s.get(k + '_s') or 0 for k in keys), ' '.join('%s %.2f' % (k, s.get(k + '_s') or 0) for k in keys),
      '; fill %.2f GB/s;' % (s['fill_gbps'] or 0), 'model %.2f; compile_prepare %s; bytecode %s;' % (s['slots_parts']['model_s'], s['overlapped']['compile_prepare_s'], s['bytecode']['prefix'] is not None),
      'decode %.2f ms/token, itl p50 %.1f p90 %.1f' % (m['decode_ms'] / m['decode_steps'], m['itl_p50_ms'], m['itl_p90_ms']),
      r['outputs'][0]['token_ids'][:8])" | tee -a $OUT/k/runs.txt
  grep "TRACE" /tmp/h/$i.log | tee -a $OUT/k/runs.txt
done
cp /tmp/h/t1.trace.json /tmp/h/x1.trace.json /tmp/h/t1.json /tmp/h/b1.json $OUT/k/
date -u +%H:%M:%S
