#!/bin/bash
# issue 13: the default after AD (page-cache residency asked with cachestat) on another lease: w0 compiles, c1-c7 fresh
# processes of the cached config; ran under a 270 s limit (the session's last device seconds): what finished is in runs.txt.
bash benchmarks/results/setup_h200/v7/arms.sh ae "w0 c1 c2 c3 c4 c5 c6 c7"
