#!/usr/bin/env bash
cd /work/main
for s in 0 1 2 3; do
  .venv/bin/python -m prefopt data synth /work/probe/rmstudy/train-s$s.jsonl --set seed=$s --overwrite > /work/probe/rmstudy/synth-s$s.log 2>&1
done
.venv/bin/python -m prefopt data synth /work/probe/rmstudy/eval.jsonl --set seed=10 --set data.k=8 --set data.pairs_per_prompt=8 --overwrite > /work/probe/rmstudy/synth-eval.log 2>&1
echo done > /work/probe/rmstudy/synth.done
