#!/usr/bin/env bash
# One prepared GPU run of bench_kv.py's table, under 10 minutes on one H100/H200-class GPU: the
# head-wise cache in plain transformers against DynamicCache on a random-weight model of
# Llama-3-8B's shape (bf16, all 32 layers), at 32K and 128K tokens: cache bytes measured and
# predicted, peak GPU memory added over the loaded model (the allocator's peak), prefill seconds,
# decode ms per token. Variants: DynamicCache prefilled in one call and in 4K chunks; the head-wise
# cache (a random quarter of KV heads full, sink 4, window 256) windowed in 4K chunks, and
# decode-only (the prompt in one call).
#
# Needs rh_lens installed (pip install -e .) in an environment with a CUDA torch.
#   benchmarks/gpu_kv.sh                 # on the GPU; the table on stdout and in $OUT (default .), as .md and .json
#   benchmarks/gpu_kv.sh --cpu-dry-run   # the same steps, 1 layer and short prompts, on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
variants=(hf-dynamic hf-dynamic+chunked hf-0.25+chunked hf-0.25+decode-only)
if [[ "${1:-}" == "--cpu-dry-run" ]]; then
    common=(--shape llama-3-8b --layers 1 --device cpu --dtype bfloat16 --prefill-chunk 256 --steps 2)
    lengths=(600)
else
    common=(--shape llama-3-8b --device cuda --dtype bfloat16 --prefill-chunk 4096 --steps 16)
    lengths=(32768 131072)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
fi
timeout 560 python benchmarks/bench_kv.py "${common[@]}" --lengths "${lengths[@]}" --variants "${variants[@]}" \
    --save "$OUT/bench_kv_raw.json" --json "$OUT/bench_kv_llama-3-8b.json" | tee "$OUT/bench_kv_llama-3-8b.md"
