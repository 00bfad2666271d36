#!/bin/bash
# call 1 again with host_timeline's fix (events of copies fetched ahead waited for), same machine
set -x
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
python3 benchmarks/stream_profile.py --work /tmp/sbq --layers 2 --batch 16 --formats native int4 --json $OUT/r/sp16.json > $OUT/r/sp16.log 2>&1
python3 benchmarks/stream_profile.py --work /tmp/sbq --layers 2 --batch 1 --formats int4 --json $OUT/r/sp1.json > $OUT/r/sp1.log 2>&1
grep -v "^ \{4,\}[0-9.]\+  " $OUT/r/sp16.log | grep -v "host_late,\|^ \+idle.*host_late" | tail -40; grep -A12 "host timeline" $OUT/r/sp1.log
