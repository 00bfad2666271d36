#!/bin/bash
# issue 13: the compile phase of a warm fresh process, with whole compiled functions loaded from the host's compile cache
# (worker.model.aot: torch's ahead-of-time compile, no Dynamo tracing in a later process). k the default (torch.compile:
# Dynamo traces every function in every process, Inductor's code from its cache), a aot.ENABLED (a0 compiles ahead and
# writes the files, a1-a5 load them). Same tokens required in every process. Then each arm's compile counts and timers.
export SET_a="--set worker.model.aot:ENABLED=true"
bash benchmarks/results/setup_h200/v7/arms.sh y "w0 a0 k1 a1 k2 a2 k3 a3 k4 a4 k5 a5"
python3 - <<'PY' | tee -a $OUT/y/runs.txt
import glob, json, os
for p in sorted(glob.glob("/tmp/h/[a-z][0-9].json")):
    r = json.load(open(p)); c = r["compile_cache"]
    print(os.path.basename(p)[:-5], "compile %.2f s;" % r["setup"]["compile_s"],
          {k: c.get(k) for k in ("graphs", "compiled_from_cache", "fxgraph_cache_hit", "aot_loaded", "aot_compiled", "aot_fallback", "aot_error")},
          {k: round(v, 3) for k, v in c["seconds"].items()})
PY
ls -la /root/.cache/streambench/compile/*/aot/* 2>&1 | head -20 > $OUT/y/aot_files.txt
grep -h "compile ahead" /tmp/h/*.log | sort | uniq -c | head -20 >> $OUT/y/aot_files.txt
