#!/bin/bash
# issue 17: host timeline with per-call sequence, per-step totals and allocator events (fresh machine)
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
python3 benchmarks/stream_profile.py --work /tmp/sbq --layers 2 --batch 16 --formats int4 --json $OUT/r/sp16.json > $OUT/r/sp16.log 2>&1
grep -v "^ \{4,\}[0-9.]\+  " $OUT/r/sp16.log | grep -v "^ \+idle.*host_late" | tail -90
