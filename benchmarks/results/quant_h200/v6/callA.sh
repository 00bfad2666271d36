#!/bin/bash
# issue 17, every format on the current path (the embedding table mapped on the resident load's thread, 941e380+),
# fresh machine: the CUDA test of the mapping, then 70B geometry 2 layers prompt 512, batch 1 under 6 GiB:
# gpu/cpu/ssd of native/int8/int4 and the accelerate peer in one command, then mixed with the time left
# (same --runs folder: one table). The tarball is rewritten after every run, so a cut keeps what finished.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_host_table.py 2>&1 | tail -3
Q="python3 benchmarks/quant_h200.py --work /tmp/sbq --layers 2 --runs b1 --batches 1"
timeout $((560 - SECONDS)) $Q --out $OUT/r/b1.tar.gz --modes gpu cpu ssd --only native int8 int4 peer > $OUT/r/b1.log 2>&1
timeout $((585 - SECONDS)) $Q --out $OUT/r/b1.tar.gz --modes mixed --only native int8 int4 > $OUT/r/b1m.log 2>&1
grep wall $OUT/r/b1.log $OUT/r/b1m.log; tail -8 $OUT/r/b1m.log $OUT/r/b1.log | tail -12
