#!/bin/bash
# usage: run_trial.sh NN --set a=b --set c=d ...
# Runs the HEAD commit's code (a `git archive HEAD` copy in /tmp/prefopt-head), not the working tree that is being
# edited, so every trial runs the same code; one torch thread. The copy's bench_speed.py has one local edit: with
# BENCH_SPEED_KEEP set it copies the child's log and run folder (adapters left out) there before deleting its temp dir.
source /work/main/.venv/bin/activate
cd /tmp/prefopt-head
nn=$1; shift
d=/work/main/results/fast_default_search
echo "code: $(cat /tmp/prefopt-head/COMMIT) (git archive copy of that commit)  start: $(date -Is)" > $d/trial-$nn.log
BENCH_SPEED_KEEP=$d/trial-$nn-run OMP_NUM_THREADS=1 python benchmarks/bench_speed.py --presets default --set threads=1 "$@" \
  --out $d/trial-$nn.json >> $d/trial-$nn.log 2>&1
rc=$?
echo "end: $(date -Is) rc=$rc" >> $d/trial-$nn.log
