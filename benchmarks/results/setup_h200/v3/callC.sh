#!/bin/bash
# issue 13: where a fresh process's imports go on this machine (benchmarks/import_probe.py: bytecode present?
# a pycache prefix?), then the 6-layer 70B cpu point's fresh-process setup with torch's bytecode kept under
# the cache dir (worker/host/bytecode.py, default) against STREAMBENCH_BYTECODE_CACHE=0, pairs in one command.
set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/s
git log --oneline -1 2>/dev/null; env | grep -i "^python" ; nproc
timeout 150 python3 benchmarks/import_probe.py --json $OUT/s/import_probe.json --repeats 2 2>&1 | tee $OUT/s/import_probe.log
timeout $((590 - SECONDS)) python3 benchmarks/setup_ab.py --work /tmp/sbg --json $OUT/s/setup_bc.json --pairs 2 \
    --flag --base-flag --env STREAMBENCH_BYTECODE_CACHE=1 --base-env STREAMBENCH_BYTECODE_CACHE=0 > $OUT/s/setup_bc.log 2>&1
tail -30 $OUT/s/setup_bc.log
