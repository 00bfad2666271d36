#!/bin/bash
# issue 13: Z again, whole: the CUDA tests of mode-to-mode exactness with whole compiled functions on (the default since
# dec2320), in one pytest process, and how many signatures that process compiled ahead, loaded, or ran on torch.compile's
# own path (worker.model.aot.counts(); tests that start processes of their own are not in it: the .aot files written are).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD; mkdir -p $OUT/ab
timeout 500 python3 -c "
import sys, pytest
from worker.model import aot
rc = pytest.main(['-v', '-p', 'no:cacheprovider', '-o', 'timeout=0', 'tests/test_graphs.py', 'tests/test_kv_graphs.py',
                  'tests/test_quant_modes.py', 'tests/test_streaming.py'])
print('aot counts of the pytest process:', aot.counts(), 'first error:', aot.first_error())
sys.exit(rc)" > $OUT/ab/pytest.txt 2>&1; echo "rc $?" >> $OUT/ab/pytest.txt
tail -n 25 $OUT/ab/pytest.txt
echo ".aot files written: $(find / -xdev -name '*.aot' 2>/dev/null | wc -l)" | tee -a $OUT/ab/pytest.txt
