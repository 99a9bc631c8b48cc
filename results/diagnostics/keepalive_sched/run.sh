#!/bin/bash
# The concurrency figure at 3,000 connections (router, mimbox-1w, haproxy-1t-tcp; end-host-bound) with
# `perf sched record` on the converter's core (CPU 1) the whole time; then analyze.py on the data.
#   results/diagnostics/keepalive_sched/run.sh OUT_DIR
set -euo pipefail
out=$(readlink -f "${1:?an output directory}"); mkdir -p "$out"
cd "$(dirname "$0")/../../.." && export PATH=$PWD/.venv/bin:$PATH
export MIMBOX_RESULTS=$out/results
perf sched record -C 1 -o "$out/sched.data" -- sleep 100000 > "$out/perf.log" 2>&1 &
P=$!
trap 'kill -INT $P 2>/dev/null; wait $P' EXIT
python -c "from experiments import concurrency; concurrency.main(quick=False, counts=[3000], bound_counts=[], idle_seconds=5.0, new_seconds=5.0, only=['mimbox-1w', 'haproxy-1t-tcp'])" > "$out/run.log" 2>&1
kill -INT $P; wait $P || true; trap - EXIT
python "$(dirname "$0")/analyze.py" "$out/sched.data" "$out/run.log"
