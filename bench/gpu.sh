#!/usr/bin/env bash
# The GPU checks, in one go: the CUDA tests, then head and embed timings side by side with the CPU.
# Usage: bench/gpu.sh OUT_DIR   (on a machine with a CUDA GPU; hexpress importable from the repo root)
set -uo pipefail
out=${1:?usage: bench/gpu.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, numpy, sklearn, timm; print('torch', torch.__version__, 'numpy', numpy.__version__, 'sklearn', sklearn.__version__, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$out/gpu.txt"

# 1. tests: the CUDA-only ones, and the head tests on this machine's stack
timeout 150 python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_ridge.py \
  tests/test_pls_mlp_metrics_cv.py 2>&1 | tee "$out/tests.log" | tail -n 25

# 2. heads: ridge and MLP on the GPU and on this machine's CPU cores, sklearn RidgeCV as the reference
timeout 260 python3 bench/heads.py --repeat 2 --json "$out/heads_gpu.json" \
  --methods hexpress_ridge@cuda,hexpress_ridge@cpu,sklearn_ridgecv,hexpress_mlp@cuda,hexpress_mlp@cpu

# 3. embed throughput on the GPU (generated tiles: ../shared does not travel)
timeout 240 python3 bench/embed.py --device cuda --backbone efficientnet_lite0 --backbone resnet50 --backbone vit_base \
  --n 2000 --batch-size 128 --json "$out/embed_gpu.json"
