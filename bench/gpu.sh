#!/usr/bin/env bash
# The GPU checks in one run of at most 6 minutes: the CUDA tests, the embed engine against its limits
# (forward only, Pillow and nvJPEG decode, end-to-end PNG and JPEG, three-backbone pass), then ridge on the
# GPU beside sklearn. Every step has its own timeout; the sum stays under 360 s.
# Usage: bench/gpu.sh OUT_DIR   (on a machine with a CUDA GPU; hexpress importable from the repo root)
set -uo pipefail
out=${1:?usage: bench/gpu.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, torchvision, numpy, sklearn, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'numpy', numpy.__version__, 'sklearn', sklearn.__version__, 'timm', timm.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$out/gpu.txt"

# 1. tests: the CUDA-only ones (ridge, MLP, embed, nvJPEG) and the decode path on this machine's stack (~60 s)
timeout 80 python3 -m pytest -q -rs -p no:cacheprovider tests/regress/heads/test_cuda.py tests/featurize/engine/test_decode.py 2>&1 \
  | tee "$out/tests.log" | tail -n 25
echo "[gpu.sh] tests done at $((SECONDS - start)) s"

# 2. embed against its limits: 12,000 rows per format (2,000 files listed 6 times), batch 256, bf16 (~170 s)
timeout 200 python3 bench/embed.py --device cuda --backbone efficientnet_lite0 --backbone resnet50 \
  --backbone vit_base --multi --n 2000 --rows-per-tile 6 --batch-size 256 --fwd-seconds 1 --json "$out/embed_gpu.json" \
  2>&1 | tee "$out/embed_gpu.log" | grep -v '^\[embed\]'
echo "[gpu.sh] embed done at $((SECONDS - start)) s"

# 3. the same JPEG tiles decoded by Pillow in the workers, for the nvJPEG gain in this run (~30 s)
timeout 40 python3 bench/embed.py --device cuda --decode pil --formats jpg --backbone resnet50 --n 2000 \
  --rows-per-tile 6 --batch-size 256 --fwd-seconds 1 --json "$out/embed_gpu_pil.json" 2>&1 | tee "$out/embed_gpu_pil.log" \
  | grep -v '^\[embed\]'
echo "[gpu.sh] embed (Pillow) done at $((SECONDS - start)) s"

# 4. ridge on the GPU beside sklearn RidgeCV (the reference-task shape) (~30 s)
timeout 30 python3 bench/heads.py --repeat 1 --json "$out/heads_gpu.json" \
  --methods hexpress_ridge@cuda,sklearn_ridgecv
echo "[gpu.sh] all done at $((SECONDS - start)) s"
