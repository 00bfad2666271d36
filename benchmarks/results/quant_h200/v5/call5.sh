#!/bin/bash
# issue 17: py-spy on the steady decode steps (from step 20: compiles done), without pausing the process,
# int4 cpu mode batch 16 then batch 1, fresh machine
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/r
SPY=/tmp/site/bin/py-spy
for B in 16 1; do
  rm -f /tmp/mark
  python3 benchmarks/stream_profile.py --work /tmp/sbq --layers 2 --batch $B --formats int4 --steps 500 --mark /tmp/mark \
      --json $OUT/r/sp$B.json > $OUT/r/sp$B.log 2>&1 &
  P=$!
  while [ ! -f /tmp/mark ] && kill -0 $P 2>/dev/null; do sleep 0.1; done
  $SPY record --pid $P --duration 5 --rate 250 --threads --idle --nonblocking --format raw -o $OUT/r/spy$B.txt > $OUT/r/spy$B.log 2>&1
  wait $P
  tail -2 $OUT/r/spy$B.log; grep "ms/step\|whole steps\|during idle" $OUT/r/sp$B.log
done
cd $OUT/r && tar czf spy.tar.gz spy16.txt spy1.txt && rm spy16.txt spy1.txt
