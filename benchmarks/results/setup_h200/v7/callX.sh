#!/bin/bash
# issue 13, NOT RUN YET (for a later lease): the compile phase of a warm fresh process (2.3-3.8 s in Q-U; how much of it is Dynamo tracing
# the model again in every process is not split yet) with torch's Dynamo precompile cache (torch._dynamo.config.caching_precompile, read
# from TORCH_CACHING_PRECOMPILE in the CPU VM's torch 2.13: check the device's 2.11 first; its artifacts under the inductor
# cache dir, which worker.model.compile_cache keys by commit and torch, not by this flag: key it before making it a default).
# k the default, p TORCH_CACHING_PRECOMPILE=1 (p0 populates it). Same tokens required in every process.
export ENV_p="TORCH_CACHING_PRECOMPILE=1"
exec bash benchmarks/results/setup_h200/v7/arms.sh x "w0 p0 k1 p1 k2 p2 k3 p3 k4 p4 k5 p5"
