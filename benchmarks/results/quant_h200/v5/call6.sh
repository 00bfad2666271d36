#!/bin/bash
# issue 17 after the fix (the host-kept embedding table mapped into the GPU: no host sync per step),
# fresh machine, one command: CUDA tests; then 70B geometry 2 layers prompt 512, 14 GiB, batch 16:
# default (mapped) vs --no-embed-zero-copy (the old host gather) interleaved in one call; batch 1 cpu;
# a stream_profile of int4 b16 with the host timeline.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
git log --oneline -1 2>/dev/null
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_host_table.py 2>&1 | tail -3
Q="python3 benchmarks/quant_h200.py --work /tmp/sbq --layers 2 --budget-gib 14"
timeout 250 $Q --out $OUT/r/a16.tar.gz --runs a16 --batches 16 --modes gpu cpu --only native int4 > $OUT/r/a16.log 2>&1
timeout 90 $Q --out $OUT/r/b16.tar.gz --runs b16 --batches 16 --modes cpu --only native int4 --run-flags=--no-embed-zero-copy > $OUT/r/b16.log 2>&1
timeout 90 $Q --out $OUT/r/a1.tar.gz --runs a1 --batches 1 --modes cpu --only native int4 > $OUT/r/a1.log 2>&1
for f in a16 b16 a1; do tail -7 $OUT/r/$f.log; done
[ $SECONDS -lt 470 ] && timeout $((575 - SECONDS)) python3 benchmarks/stream_profile.py --work /tmp/sbq --layers 2 --batch 16 --formats int4 --json $OUT/r/sp16.json > $OUT/r/sp16.log 2>&1
grep "ms/step\|whole steps\|during idle\|copy stream\|host timeline" $OUT/r/sp16.log
