#!/bin/bash
# issue 13, NOT RUN YET (for the next lease, after callV.sh): the fill's first tenth (U: about half the threads reading).
# k the default, a MAP_AHEAD=2 (two groups mapped before the first read and split over the threads, so none waits
# for the second group's map). Alternating (if V's winner became the default, both arms have it).
export SET_a="--set worker.stream.fill:MAP_AHEAD=2"
exec bash benchmarks/results/setup_h200/v7/arms.sh w "w0 k1 a1 k2 a2 k3 a3 k4 a4 k5 a5 k6 a6"
