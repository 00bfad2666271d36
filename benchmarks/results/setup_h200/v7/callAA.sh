#!/bin/bash
# issue 13, NOT RUN YET (for the next lease): the compiler's import, now the longest step before measuring (Y: 2.1-3.2 s on
# its side thread, the model build waiting 2.1-3.1 s for it). k the default (whole compiled functions loaded,
# worker.model.aot; Inductor's compile_fx imported ahead), b compile_cache.BACKEND_AHEAD=false (a process whose functions
# all load never imports compile_fx: tests/test_compile_aot.py), n STREAMBENCH_COMPILE_WHOLE=0 (torch.compile's own path,
# as before Y). w0 compiles from scratch and writes the files. Alternating, 4 each; then each arm's compile counts.
export SET_b="--set worker.model.compile_cache:BACKEND_AHEAD=false"
export ENV_n="STREAMBENCH_COMPILE_WHOLE=0"
bash benchmarks/results/setup_h200/v7/arms.sh aa "w0 k1 b1 n1 k2 b2 n2 k3 b3 n3 k4 b4 n4"
python3 - <<'PY' | tee -a $OUT/aa/runs.txt
import glob, json, os
for p in sorted(glob.glob("/tmp/h/[a-z][0-9].json")):
    r = json.load(open(p)); c = r["compile_cache"]
    print(os.path.basename(p)[:-5], "compile %.2f s; ahead import %.2f s;" % (r["setup"]["compile_s"], r["setup"]["overlapped"]["compile_prepare_s"] or 0),
          {k: c.get(k) for k in ("graphs", "compiled_from_cache", "fxgraph_cache_hit", "aot_loaded", "aot_compiled", "aot_fallback", "aot_error")},
          {k: round(v, 3) for k, v in c["seconds"].items()})
PY
