#!/bin/bash
# issue 13.2, warm: registration on the reader thread that completes a range (worker/stream/fill.py PIN_THREADS 0)
# against a pinning thread of its own (1, the fill before), in one command on one machine. (1) cpu_fill.py --cache
# warm: the sources and both fills, alone, beside a GIL-holding thread (busy), and with the switch interval the
# engine sets under the compile-ahead import (busy+sw). (2) fresh `bench run` processes of the 6-layer 70B cpu
# point with --warm-page-cache after an untimed first one (w0: makes the compile cache): the new default (n)
# alternating with the old one (o: PIN_THREADS 1), every arm started the same way (python3 -c, fill imported
# first), and x: the new default without the compile-ahead import beside the fill (--no-compile-ahead).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/w /tmp/h
M=/tmp/sbg/llama3.1-70b-6L
nproc; free -g | head -2
date -u +%H:%M:%S
timeout 300 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --repeats 2 \
  --variants pin1+huge pin0+huge pin1+huge+busy pin0+huge+busy pin1+huge+busy+sw pin0+huge+busy+sw \
  --json $OUT/w/cpu_fill_warm.json > $OUT/w/cpu_fill_warm.log 2>&1
grep -E "round|source|new|old|median|GB;" $OUT/w/cpu_fill_warm.log | tail -n 24
date -u +%H:%M:%S
A="-v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in w0 n1 o1 n2 o2 x1 n3 o3 x2; do
  P="from worker.stream import fill as F"
  [ ${i:0:1} = o ] && P="$P; F.PIN_THREADS = 1"
  X=""; [ ${i:0:1} = x ] && X="--no-compile-ahead"
  timeout 150 python3 -c "$P; import cli; cli.main()" $A $X --out-json /tmp/h/$i.json > /tmp/h/$i.log 2>&1 || tail -n 3 /tmp/h/$i.log
  python3 -c "
import json; r = json.load(open('/tmp/h/$i.json')); s = r['setup']
keys = ('process', 'imports', 'tokenizer', 'pack', 'fill', 'slots', 'compile', 'warmup', 'probe')
print('$i', 'before measuring %.2f s;' % sum(s.get(k + '_s') or 0 for k in keys), ' '.join('%s %.2f' % (k, s.get(k + '_s') or 0) for k in keys),
      '; fill %.2f GB/s, page cache %.2f GB' % (s['fill_gbps'] or 0, (s['fill_page_cache_bytes'] or 0) / 1e9),
      s['overlapped'], 'from cache', r['compile_cache']['compiled_from_cache'],
      'decode %.2f ms/token' % (r['metrics']['decode_ms'] / r['metrics']['decode_steps']), r['outputs'][0]['token_ids'][:8])" | tee -a $OUT/w/runs.txt
done
cp /tmp/h/n1.json /tmp/h/n1.log /tmp/h/o1.json /tmp/h/x1.json $OUT/w/
date -u +%H:%M:%S
