#!/bin/bash
# issue 17, batch 16 under 14 GiB on the current path, right after callA.sh (same machine if it stayed warm; the
# model and packs are remade otherwise): gpu/cpu/ssd of native/int8/int4 and the peer in one command; the peer
# again under 6 GiB (at 14 GiB the 2-layer model fits and the peer keeps it resident); then mixed with the time left.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
ls /tmp/sbq 2>/dev/null
Q="python3 benchmarks/quant_h200.py --work /tmp/sbq --layers 2 --batches 16"
timeout $((500 - SECONDS)) $Q --runs b16 --budget-gib 14 --out $OUT/r/b16.tar.gz --modes gpu cpu ssd --only native int8 int4 peer > $OUT/r/b16.log 2>&1
timeout $((535 - SECONDS)) $Q --runs b16p6 --budget-gib 6 --out $OUT/r/b16p6.tar.gz --modes cpu --only peer > $OUT/r/b16p6.log 2>&1
timeout $((585 - SECONDS)) $Q --runs b16 --budget-gib 14 --out $OUT/r/b16.tar.gz --modes mixed --only native int8 int4 > $OUT/r/b16m.log 2>&1
grep wall $OUT/r/b16.log $OUT/r/b16p6.log $OUT/r/b16m.log; tail -10 $OUT/r/b16m.log $OUT/r/b16.log | tail -14; tail -4 $OUT/r/b16p6.log
