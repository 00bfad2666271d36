#!/bin/bash
# issue 13, the page-cache fill's start (AA/AC traces: the first group's reads, 302 MB, done ~20 ms into the fill; the
# second group's issued only at 30-40 ms, after the fill's thread asked mincore about its 1.4 GB): c the default now,
# worker.stream.pagecache asking cachestat (Linux 6.5) per chunk instead, no mapping; k mincore as before
# (pagecache.CACHESTAT=false). Alternating, 6 each; then each arm's read starts from its trace, and both ways of asking
# timed on the 12 groups with nothing else running.
export SET_k="--set worker.stream.pagecache:CACHESTAT=false"
bash benchmarks/results/setup_h200/v7/arms.sh ad "w0 k1 c1 k2 c2 k3 c3 k4 c4 k5 c5 k6 c6"
python3 - <<'PY' | tee -a $OUT/ad/runs.txt
import json
for a in "kc":
    for i in range(1, 7):
        try:
            f = json.load(open(f"/tmp/h/{a}{i}.trace.json"))[0]
        except (OSError, ValueError):
            continue
        reads = sorted((c for c in f["calls"] if c[0] == "read"), key=lambda c: c[2])
        pins = [c for c in f["calls"] if c[0] == "pin"]
        print(f"{a}{i} fill {f['fill_s'] * 1e3:.1f} ms: reads 1-16 start {reads[0][2] * 1e3:.1f}-{reads[15][2] * 1e3:.1f} ms, "
              f"end {min(c[3] for c in reads[:16]) * 1e3:.1f}-{max(c[3] for c in reads[:16]) * 1e3:.1f}; 17-32 start "
              f"{reads[16][2] * 1e3:.1f}-{reads[31][2] * 1e3:.1f}; last read ends {max(c[3] for c in reads) * 1e3:.1f}, "
              f"last pin ends {max(c[3] for c in pins) * 1e3:.1f}; of the source "
              f"{f['read']['bytes'] / 1e9 / f['fill_s'] / f['source_after_gbps']:.2f}")
PY
python3 - <<'PY' 2>&1 | tee -a $OUT/ad/runs.txt
import time
from worker.pack.blob import Pack
from worker.pack.groups import KINDS, GroupKey
from worker.stream import pagecache
from worker.stream.ssd import SSDReader
pack = Pack.open("/tmp/sbg/llama3.1-70b-6L/.streambench-pack/bfloat16.manifest.json")
r = SSDReader(pack.blob_path, 8, 64 << 20)
groups = [pack.manifest.group(GroupKey(i, k).name) for i in range(6) for k in KINDS]
for way in (True, False, True, False):
    pagecache.CACHESTAT = way
    t = []
    for g in groups:
        t0 = time.perf_counter(); flags = r.cached_chunks(g.offset, g.nbytes); t.append(time.perf_counter() - t0)
    print("cachestat" if way else "mincore  ", "per group ms:", " ".join("%.2f" % (x * 1e3) for x in t), "all cached:", all(flags))
r.close()
PY
