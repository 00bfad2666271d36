#!/bin/bash
# As run at 35d4d2b. Its m and p arms set worker.stream.fill:MAP_THREAD and PIN_EARLY, removed after this run (AC: slower),
# so those arms no longer run as written.
# issue 13, the page-cache fill's two ends (AA's traces: the first group's reads done ~20 ms into the fill, the second
# group's issued only at 30-36 ms, after its map on the fill's thread; and 5-6 ranges, 1088-1344 MiB, still queued for
# the registration slot after the last read, 24-31 ms). m: worker.stream.fill.MAP_THREAD (every map on a thread of its
# own, ahead of the issue); p: m plus PIN_EARLY (the ranges among the last PIN_EARLY bytes faulted in with
# MADV_POPULATE_WRITE on a thread of their own, then registered before their reads, while the readers' ranges queue).
# benchmarks/cpu_fill.py first, the fill alone, 10 rounds (it also makes the checkpoint and the pack); p's PIN_EARLY is
# the size among 1024/1536/2048 MiB whose median ratio to the source into fresh memory was best. Then the arms in-run,
# alternating, k the default.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p $OUT/ac /tmp/h
uname -r | tee $OUT/ac/runs.txt
timeout 230 python3 benchmarks/cpu_fill.py --work /tmp/sbg --layers 6 --cache warm --no-old --repeats 10 \
  --variants pin0+huge pin0+huge+map pin0+huge+map+early1024 pin0+huge+map+early1536 pin0+huge+map+early2048 \
  --json /tmp/h/cf.json > $OUT/ac/cpu_fill.txt 2>&1
tail -n 2 $OUT/ac/cpu_fill.txt
EARLY=$(python3 - <<'PY'
import json, statistics
r = json.load(open("/tmp/h/cf.json"))["warm"]["rounds"]
med = {v: statistics.median(x["source_fresh_s"] / x[v]["seconds"] for x in r) for v in r[0] if v.startswith("new_")}
best = max((v for v in med if "early" in v), key=med.get)
print(int(best.rsplit("early", 1)[1]) * 2**20)
PY
)
echo "p: PIN_EARLY=$EARLY" | tee -a $OUT/ac/runs.txt
export SET_m="--set worker.stream.fill:MAP_THREAD=true"
export SET_p="--set worker.stream.fill:MAP_THREAD=true --set worker.stream.fill:PIN_EARLY=$EARLY"
bash benchmarks/results/setup_h200/v7/arms.sh ac "w0 k1 m1 p1 k2 m2 p2 k3 m3 p3 k4 m4 p4 k5 m5 p5"
python3 - <<'PY' | tee -a $OUT/ac/runs.txt
import json
for a in "kmp":
    for i in range(1, 6):
        try:
            f = json.load(open(f"/tmp/h/{a}{i}.trace.json"))[0]
        except (OSError, ValueError):
            continue
        reads = sorted((c for c in f["calls"] if c[0] == "read"), key=lambda c: c[2])
        pins = [c for c in f["calls"] if c[0] == "pin"]
        print(f"{a}{i} fill {f['fill_s'] * 1e3:.1f} ms: reads 1-16 start {reads[0][2] * 1e3:.1f}-{reads[15][2] * 1e3:.1f} ms, "
              f"17-32 {reads[16][2] * 1e3:.1f}-{reads[31][2] * 1e3:.1f}; last read ends {max(c[3] for c in reads) * 1e3:.1f}, "
              f"last pin ends {max(c[3] for c in pins) * 1e3:.1f}; of the source {f['read']['bytes'] / 1e9 / f['fill_s'] / f['source_after_gbps']:.2f}")
PY
# AB's one failure (Upload on an index-less cuda device, torch 2.11), after its fix
timeout 90 python3 -m pytest -q -p no:cacheprovider -o timeout=0 tests/test_streaming.py -k resident_layers_count_once 2>&1 | tail -n 2 | tee -a $OUT/ac/runs.txt
