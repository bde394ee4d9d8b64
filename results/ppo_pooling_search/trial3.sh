#!/usr/bin/env bash
# trial.sh NAME SEED [--set ...]: one PPO-only default bench at 1 thread, pairs+RM from the shared cache
set -u
name=$1; seed=$2; shift 2
cd /work/main
out=/work/probe/search3/runs/$name-s$seed
rm -rf "$out" "$out.resume"
start=$(date +%s)
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 timeout 1500 /work/main/.venv/bin/python -m prefopt bench --set threads=1 --set seed=$seed --set policies=ppo "$@" \
  --cache /work/probe/search3/cache --out "$out" > /work/probe/search3/logs/$name-s$seed.log 2>&1
rc=$?
echo "$name s$seed rc=$rc wall=$(( $(date +%s) - start ))" >> /work/probe/search3/done.txt
