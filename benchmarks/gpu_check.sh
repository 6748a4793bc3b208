#!/usr/bin/env bash
# The GPU check of issue #8, for a machine with one NVIDIA GPU and PyTorch (no Ray or MLflow needed):
# one-step inference of the ffhq preset at 256² (eager fp32 against the engine: bf16, SDPA, fused norm,
# torch.compile, CUDA graphs), its numerics (PSNR >= 45 dB against fp32), and the teacher and distillation
# steps (eager fp32 against bf16 + fast modules + compile). Budget: under 6 minutes.
#   bash benchmarks/gpu_check.sh [OUT_DIR]      -> OUT_DIR/gpu_check.json (default benchmarks/results)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results}"
mkdir -p "$out"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}"  # reused by later runs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 340 python benchmarks/gpu_infer.py --device cuda --preset ffhq --size 256 --batch 64 --train-batch 8 \
  --seconds 6 --out "$out/gpu_check.json"
