#!/bin/bash
# As run at 41b58e1. Its e arm set worker.stream.fill:PIN_EARLY, which was removed after this run (AA: slower), so that arm no
# longer runs as written.
# issue 13, both open targets in one command.
# 1. The page-cache fill's tail (after U-Y: 15-45 ms of ranges still queued for the one registration slot after the last
#    read): worker.stream.fill.PIN_EARLY registers the ranges among the fill's last PIN_EARLY bytes before their reads,
#    on a thread of its own, while the slot idles (no range is read yet in a fill's first ~80 ms). benchmarks/cpu_fill.py
#    first, the fill alone, 8 rounds of the source into fresh memory and the default fill against 512 MiB, 1 GiB and
#    2 GiB early (it also makes the checkpoint and the pack); the arms' e then uses the size whose median ratio was best.
# 2. The compiler's import, the longest step before measuring (Y: 2.1-3.2 s on its side thread, the model build waiting
#    2.1-3.1 s for it): b compile_cache.BACKEND_AHEAD=false (a process whose functions all load never imports Inductor's
#    compile_fx: tests/test_compile_aot.py). k the default. w0 compiles from scratch and writes the files. Alternating.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/aa /tmp/h
timeout 200 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --no-old --repeats 8 \
  --variants pin0+huge pin0+huge+early512 pin0+huge+early1024 pin0+huge+early2048 --json /tmp/h/cf.json > $OUT/aa/cpu_fill.txt 2>&1
tail -n 3 $OUT/aa/cpu_fill.txt
EARLY=$(python3 - <<'PY'
import json, statistics
r = json.load(open("/tmp/h/cf.json"))["warm"]["rounds"]
med = {v: statistics.median(x["source_fresh_s"] / x[v]["seconds"] for x in r) for v in r[0] if v.startswith("new_")}
best = max((v for v in med if "early" in v), key=med.get)
print(int(best.rsplit("early", 1)[1]) * 2**20)
PY
)
echo "e: PIN_EARLY=$EARLY" | tee $OUT/aa/runs.txt
export SET_e="--set worker.stream.fill:PIN_EARLY=$EARLY"
export SET_b="--set worker.model.compile_cache:BACKEND_AHEAD=false"
bash benchmarks/results/setup_h200/v7/arms.sh aa "w0 k1 e1 b1 k2 e2 b2 k3 e3 b3 k4 e4 b4"
python3 - <<'PY' | tee -a $OUT/aa/runs.txt
import glob, json, os
for p in sorted(glob.glob("/tmp/h/[a-z][0-9].json")):
    r = json.load(open(p)); c = r["compile_cache"]
    print(os.path.basename(p)[:-5], "compile %.2f s; ahead import %.2f s;" % (r["setup"]["compile_s"], r["setup"]["overlapped"]["compile_prepare_s"] or 0),
          {k: c.get(k) for k in ("graphs", "compiled_from_cache", "fxgraph_cache_hit", "aot_loaded", "aot_compiled", "aot_fallback", "aot_error")})
PY
