#!/bin/bash
# issue 13.2: the compile-ahead thread's switch interval (worker/model/compile_cache.py AHEAD_SWITCH_S, 0.5 ms)
# against the interpreter's default (5 ms, set back from outside: AHEAD_SWITCH_S=0.005), alternating, fresh
# processes of the 6-layer 70B cpu point with the blob in the page cache (--warm-page-cache; the first, untimed
# run makes the model, pack and compile cache where the machine is fresh).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/w
M=/tmp/sbg/llama3.1-70b-6L
[ -f $M/config.json ] || python3 -c "from worker.synth.checkpoints import make_model; make_model('$M', preset='llama3.1-70b', layers=6, dtype='bfloat16', seed=0)"
A="-v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in w0 n1 b1 n2 b2; do
  P="import cli"
  [ ${i:0:1} = b ] && P="from worker.model import compile_cache; compile_cache.AHEAD_SWITCH_S = 0.005; import cli"
  timeout 120 python3 -c "$P; cli.main()" $A --out-json $OUT/w/$i.json > $OUT/w/$i.log 2>&1 || tail -n 3 $OUT/w/$i.log
  python3 -c "
import json; r = json.load(open('$OUT/w/$i.json')); s = r['setup']
keys = ('process', 'imports', 'tokenizer', 'pack', 'fill', 'slots', 'compile', 'warmup', 'probe')
print('$i', 'before measuring %.2f s;' % sum(s.get(k + '_s') or 0 for k in keys), ' '.join('%s %.2f' % (k, s.get(k + '_s') or 0) for k in keys),
      '; fill %.2f GB/s' % s['fill_gbps'], s['overlapped'], 'decode %.2f ms/token' % (r['metrics']['decode_ms'] / r['metrics']['decode_steps']), r['outputs'][0]['token_ids'][:4])"
done
