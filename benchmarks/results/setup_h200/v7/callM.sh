#!/bin/bash
# issue 13: the run's fill with (a) the CUDA context made early on a side thread (worker/host/cudactx.py) and (b) a
# 50 us switch interval while the fill runs (worker/stream/fill.py SWITCH_INTERVAL_US), against the fill as it was
# (o: --late-context, Python's 5 ms) and each alone, alternating, with cpu_fill.py's source rate before and after.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/m /tmp/h
M=/tmp/sbg/llama3.1-70b-6L
date -u +%H:%M:%S; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
source_rate() {
  timeout 200 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --repeats 1 --variants pin0+huge > /tmp/h/cf$1.log 2>&1
  grep -E "source: into|new:" /tmp/h/cf$1.log | sed "s/^/cpu_fill $1: /" | tee -a $OUT/m/runs.txt
}
source_rate 0
A="-v WARNING run --checkpoints $M --mode cpu --prompt-len 512 --max-new-tokens 8 --temperature 0 --gpu-memory-limit-gb 6.442 --warm-page-cache"
OFF="--set worker.stream.fill:SWITCH_INTERVAL_US=null"
for i in ${ARMS:-w0 o1 a1 s1 n1 o2 a2 s2 n2 o3 a3 s3 n3}; do
  case ${i:0:1} in
    o) X="--late-context $OFF";; a) X="$OFF";; s) X="--late-context";; *) X="";;
  esac
  timeout 150 python3 benchmarks/fill_trace.py $X cli $A --out-json /tmp/h/$i.json > /tmp/h/$i.log 2>&1 || tail -n 3 /tmp/h/$i.log
  python3 -c "
import json; r = json.load(open('/tmp/h/$i.json')); s = r['setup']; m = r['metrics']
keys = ('process', 'imports', 'tokenizer', 'pack', 'fill', 'slots', 'compile', 'warmup', 'probe')
print('$i', 'before measuring %.2f s;' % sum(s.get(k + '_s') or 0 for k in keys), ' '.join('%s %.2f' % (k, s.get(k + '_s') or 0) for k in keys),
      '; fill %.2f GB/s; context %s;' % (s['fill_gbps'] or 0, s['overlapped'].get('cuda_context_s')), 'decode %.2f ms/token' % (m['decode_ms'] / m['decode_steps']), r['outputs'][0]['token_ids'][:8])" | tee -a $OUT/m/runs.txt
  grep "TRACE" /tmp/h/$i.log | tee -a $OUT/m/runs.txt
  case $i in o1|n1) cp /tmp/h/$i.json $OUT/m/;; esac
done
source_rate 1
date -u +%H:%M:%S
