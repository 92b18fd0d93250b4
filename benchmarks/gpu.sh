#!/usr/bin/env bash
# Speed figures on a CUDA host, under 8 minutes: benchmarks/gpu.py (its docstring says what it measures).
#   bash benchmarks/gpu.sh                     # writes results/gpu.json (OUT=... to change), prints the tables
#   bash benchmarks/gpu.sh --no-compile        # extra arguments go to benchmarks/gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU: use python benchmarks/gpu.py --device cpu --quick'"
exec "$PY" benchmarks/gpu.py --out "${OUT:-results/gpu.json}" "$@"
