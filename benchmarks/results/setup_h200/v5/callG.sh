#!/bin/bash
# issue 13.2, warm: page-cache requests of up to CACHED_READ bytes in one system call (worker/stream/fill.py), in
# one command on one machine. (1) cpu_fill.py --cache warm: the sources and the engine's fill with requests capped
# at 64 MiB (one chunk: the fill before this change), 128 (the new default) and 256, alone and beside a
# GIL-holding thread (busy), with and without the switch interval the engine sets under the compile-ahead import
# (sw). (2) fresh `bench run` processes of the 6-layer 70B cpu point with --warm-page-cache, after an untimed
# first one (w0: makes the compile cache): the new defaults (n) alternating with the old ones injected from
# outside (o: CACHED_READ 64 MiB and the 5 ms default switch interval) and with 256 MiB requests (r).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/w
M=/tmp/sbg/llama3.1-70b-6L
nproc; free -g | head -2
date -u +%H:%M:%S
timeout 300 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --repeats 2 \
  --variants pin1+huge+read64 pin1+huge pin1+huge+read256 pin1+huge+read64+busy pin1+huge+busy \
             pin1+huge+read256+busy pin1+huge+read64+busy+sw pin1+huge+busy+sw pin1+huge+read256+busy+sw \
  --json $OUT/w/cpu_fill_warm.json > $OUT/w/cpu_fill_warm.log 2>&1
grep -E "round|source|new|old|median|GB;" $OUT/w/cpu_fill_warm.log | tail -n 40
date -u +%H:%M:%S
A="-v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in w0 n1 o1 r1 n2 o2 r2 n3 o3; do
  P="import cli"
  [ ${i:0:1} = o ] && P="from worker.stream import fill as F; F.CACHED_READ = 64 << 20; from worker.model import compile_cache; compile_cache.AHEAD_SWITCH_S = 0.005; import cli"
  [ ${i:0:1} = r ] && P="from worker.stream import fill as F; F.CACHED_READ = 256 << 20; import cli"
  timeout 150 python3 -c "$P; cli.main()" $A --out-json $OUT/w/$i.json > $OUT/w/$i.log 2>&1 || tail -n 3 $OUT/w/$i.log
  python3 -c "
import json; r = json.load(open('$OUT/w/$i.json')); s = r['setup']
keys = ('process', 'imports', 'tokenizer', 'pack', 'fill', 'slots', 'compile', 'warmup', 'probe')
print('$i', 'before measuring %.2f s;' % sum(s.get(k + '_s') or 0 for k in keys), ' '.join('%s %.2f' % (k, s.get(k + '_s') or 0) for k in keys),
      '; fill %.2f GB/s, page cache %.2f GB' % (s['fill_gbps'] or 0, (s['fill_page_cache_bytes'] or 0) / 1e9), s['overlapped'],
      'from cache', r['compile_cache']['compiled_from_cache'],
      'decode %.2f ms/token' % (r['metrics']['decode_ms'] / r['metrics']['decode_steps']), r['outputs'][0]['token_ids'][:8])"
done
date -u +%H:%M:%S
