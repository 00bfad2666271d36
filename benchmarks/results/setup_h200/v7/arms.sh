#!/bin/bash
# The A/B harness of the not-yet-run calls (callV.sh-callX.sh; Q-U ran as their own scripts say):
#   bash arms.sh OUTDIR "w0 k1 a1 k2 a2 ..."   with SET_a="--set MODULE:NAME=JSON ..." and ENV_a="VAR=value ..." per arm letter.
# Every arm a fresh `bench run` of the 6-layer 70B cpu point (prompt 512, 8 new tokens, --warm-page-cache) under
# fill_trace.py --source-after: each process reads its fill's extents from the page cache into fresh memory after the run.
# Its lines go to $OUT/OUTDIR/runs.txt as they come; the arms' JSON and logs to $OUT/OUTDIR/arms.tgz at the end.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
D=$OUT/$1; mkdir -p $D /tmp/h
M=/tmp/sbg/llama3.1-70b-6L
date -u +%H:%M:%S
[ -f $M/config.json ] || timeout 200 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --repeats 1 --variants pin0+huge > /tmp/h/cf.log 2>&1
A="-v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
for i in ${ARMS:-$2}; do
  S=SET_${i:0:1}; V=ENV_${i:0:1}  # the arm's --set options and environment, by its letter
  env ${!V} timeout 75 python3 benchmarks/fill_trace.py --source-after --json /tmp/h/$i.trace.json ${!S} cli $A --out-json /tmp/h/$i.json > /tmp/h/$i.log 2>&1 || tail -n 3 /tmp/h/$i.log
  python3 -c "
import json; r = json.load(open('/tmp/h/$i.json')); s = r['setup']; m = r['metrics']
keys = ('process', 'imports', 'tokenizer', 'pack', 'fill', 'slots', 'compile', 'warmup', 'probe')
print('$i', 'before measuring %.2f s;' % sum(s.get(k + '_s') or 0 for k in keys), ' '.join('%s %.2f' % (k, s.get(k + '_s') or 0) for k in keys),
      '; fill %.2f GB/s; context %.2f s; ahead import %s s; model build %.2f s;' % (s['fill_gbps'] or 0, s['overlapped'].get('cuda_context_s') or 0, s['overlapped'].get('compile_prepare_s'), s['slots_parts']['model_s'] or 0), 'decode %.2f ms/token' % (m['decode_ms'] / m['decode_steps']), r['outputs'][0]['token_ids'][:8])" | tee -a $D/runs.txt
  grep "TRACE" /tmp/h/$i.log | tee -a $D/runs.txt
done
date -u +%H:%M:%S
tar czf $D/arms.tgz -C /tmp/h $(cd /tmp/h && ls *.json *.log)
