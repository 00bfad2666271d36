#!/bin/bash
# issue 17, for the next session with device time (not run yet): is int8's ssd shortfall in v6 (1.79x / 1.80x,
# attainment 0.82 at batch 1) the format's or the disk's drift? native and int8 in ssd mode, two rounds each in
# alternating order (quant_h200.py --repeats 2: vs native is the median of the rounds' own ratios), batch 1 under
# 6 GiB then batch 16 under 14 GiB. ~65 s per run; the tarballs are rewritten after every run.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
Q="python3 benchmarks/quant_h200.py --work /tmp/sbq --layers 2 --modes ssd --only native int8 --repeats 2"
timeout 310 $Q --runs s1 --batches 1 --out $OUT/r/s1.tar.gz > $OUT/r/s1.log 2>&1
timeout $((585 - SECONDS)) $Q --runs s16 --batches 16 --budget-gib 14 --out $OUT/r/s16.tar.gz > $OUT/r/s16.log 2>&1
grep wall $OUT/r/s1.log $OUT/r/s16.log; tail -n 6 $OUT/r/s1.log; tail -n 6 $OUT/r/s16.log
