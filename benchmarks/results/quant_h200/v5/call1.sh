#!/bin/bash
# issue 17, int4 cpu batch 16: which host thread holds the weight copies back (host_timeline.py), and the
# fetch thread's waits in bench run's own JSON. One machine, in this order.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print(torch.__version__)"
python3 benchmarks/stream_profile.py --work /tmp/sbq --layers 2 --batch 16 --formats native int4 --json $OUT/r/sp16.json > $OUT/r/sp16.log 2>&1
python3 benchmarks/stream_profile.py --work /tmp/sbq --layers 2 --batch 1 --formats int4 --json $OUT/r/sp1.json > $OUT/r/sp1.log 2>&1
python3 benchmarks/quant_h200.py --work /tmp/sbq --out $OUT/r/q16.tar.gz --layers 2 --batches 16 --budget-gib 14 --modes cpu --only native int4 > $OUT/r/q16.log 2>&1
grep -v "^ \{4,\}[0-9.]\+  " $OUT/r/sp16.log | tail -45; tail -25 $OUT/r/sp1.log; tail -8 $OUT/r/q16.log
