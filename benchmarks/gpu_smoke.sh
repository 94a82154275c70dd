#!/usr/bin/env bash
# Short GPU checks on one H100/H200 (about 4 minutes): benchmarks/gpu_smoke.py (bf16 steps of a ~1B model,
# DCP round trip) and benchmarks/gpu_scale.py (the trainer's sharded start path at 1B and 8B widths: FSDP2,
# bf16, activation checkpointing; tokens/s, MFU, peak memory against the planner, save/resume).
# Needs torch with CUDA, transformers and accelerate; run from the repository root.
set -euo pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/gpu_smoke.py --seconds "${SECONDS_OF_TRAINING:-60}" "$@"
python3 benchmarks/gpu_scale.py --seconds "${SECONDS_OF_SCALE:-40}"
