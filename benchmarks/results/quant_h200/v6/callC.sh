#!/bin/bash
# issue 17: the mixed-mode runs calls A and B had no time left for (batch 1 under 6 GiB, batch 16 under 14 GiB;
# native in the same command as the formats); the model and packs are made where the machine is fresh. $1: seconds
# this script may take.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
END=$((SECONDS + ${1:-380}))
Q="python3 benchmarks/quant_h200.py --work /tmp/sbq --layers 2 --modes mixed --only native int8 int4"
timeout 215 $Q --runs m1 --batches 1 --out $OUT/r/m1.tar.gz > $OUT/r/m1.log 2>&1
timeout $((END - SECONDS)) $Q --runs m16 --batches 16 --budget-gib 14 --out $OUT/r/m16.tar.gz > $OUT/r/m16.log 2>&1
grep wall $OUT/r/m1.log $OUT/r/m16.log; tail -n 7 $OUT/r/m1.log; tail -n 7 $OUT/r/m16.log
