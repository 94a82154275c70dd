#!/usr/bin/env bash
# One short GPU check (about 2 minutes on one H100/H200): see benchmarks/gpu_smoke.py.
# Needs torch with CUDA and transformers; run from the repository root.
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/gpu_smoke.py --seconds "${SECONDS_OF_TRAINING:-60}" "$@"
