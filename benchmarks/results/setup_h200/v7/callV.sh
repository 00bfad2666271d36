#!/bin/bash
# issue 13, NOT RUN YET (for the next lease): the registrations queued at the fill's end (U: 3-4 ranges of 256 MiB still to register
# when the last read ends, 15-30 ms of a 420 ms fill). Units complete in waves while 16 requests of 128 MiB span 8 of them;
# smaller page-cache requests make them complete one after the other. k the default, c CACHED_READ 32 MiB, s 16 MiB,
# d two registration slots (PIN_SLOTS=2). Alternating.
export SET_c="--set worker.stream.fill:CACHED_READ=33554432"
export SET_s="--set worker.stream.fill:CACHED_READ=16777216"
export SET_d="--set worker.stream.fill:PIN_SLOTS=2"
exec bash benchmarks/results/setup_h200/v7/arms.sh v "w0 k1 c1 s1 d1 k2 c2 s2 d2 k3 c3 s3 d3 k4 c4 s4 d4"
