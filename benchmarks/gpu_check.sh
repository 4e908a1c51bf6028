#!/usr/bin/env bash
# One prepared GPU run, under 10 minutes on one H100/H200-class GPU: grid throughput and long
# contexts on a random-weight model of Llama-3-8B's shape (bf16, all 32 layers).
#
#   1. bench_batch.py: detection-shaped trials (8 depths) at 8K and 32K tokens, batch 1 vs 8,
#      with and without prefix sharing: wall time, trials/min, prompt tokens/s, max_memory_allocated;
#   2. bench_scale.py: one detection trial at 32K and 128K tokens with the full cache and with the
#      head-wise cache (25% of KV heads full, sink 4, window 256): time and memory vs the memory model;
#      then the memory model alone for Llama-2-7B's shape (no grouped-query attention) and the
#      longest context each cache fits on 80 and 141 GiB.
#
# Needs rh_lens installed (pip install -e .) in an environment with a CUDA torch.
#   benchmarks/gpu_check.sh                 # on the GPU; tables on stdout and in $OUT (default .), as .md and .json
#   benchmarks/gpu_check.sh --cpu-dry-run   # the same steps, 2 layers and short prompts, on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
if [[ "${1:-}" == "--cpu-dry-run" ]]; then
    common=(--shape llama-3-8b --layers 2 --device cpu)
    batch_lengths=(512 1024) scale_lengths=(1024 2048) trials=4
else
    common=(--shape llama-3-8b --device cuda)
    batch_lengths=(8192 32768) scale_lengths=(32768 131072) trials=8
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
python -c "import torch, transformer_lens, rh_lens; print('torch', torch.__version__, 'transformer-lens', transformer_lens.__version__ if hasattr(transformer_lens, '__version__') else '', 'rh_lens', rh_lens.__version__)"
timeout 300 python benchmarks/bench_batch.py "${common[@]}" --lengths "${batch_lengths[@]}" --trials "$trials" --batch-sizes 1 8 \
    --json "$OUT/bench_batch.json" | tee "$OUT/bench_batch.md"
timeout 270 python benchmarks/bench_scale.py "${common[@]}" --lengths "${scale_lengths[@]}" --full-fraction 0.25 \
    --json "$OUT/bench_scale.json" | tee "$OUT/bench_scale.md"
python benchmarks/bench_scale.py --shape llama-2-7b --predict-only --lengths 32768 131072 --full-fraction 0.25 \
    --json "$OUT/predict_llama2.json" | tee "$OUT/predict_llama2.md"
