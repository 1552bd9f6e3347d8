#!/usr/bin/env bash
# One GPU session's checks: the CUDA tests, then the benchmarks, JSON under results/gpu/.
# Usage: bash scripts/gpu_check.sh   (needs CUDA; ~minutes on one H100)
set -euo pipefail
PY=${PY:-python}
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
$PY -c "import torch, triton; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(), triton.__version__)"
# CUDA tests: compiled Triton kernels vs the torch twins (the same files run interpreted on CPU; the
# gpu-marked tests run the kernels at real head sizes, bf16 included)
$PY -m pytest -q -p no:cacheprovider tests/official_port/test_triton_ops.py tests/official_port/test_layers.py \
    tests/lact/test_triton_update.py 2>&1 | tee "$OUT/tests.txt"
# TTT-Linear scan (ours torch vs ours triton vs fla when installed) and the LaCT chunk op at the 760M
# shape (autograd/manual x torch/triton kernel), fwd and fwd+bwd, fp32 and bf16: one JSON file
$PY -m official_port.bench_cuda --ops ttt_linear,lact --lengths 2048,8192,32768 --lact-lengths 8192,16384,32768 \
    --dtypes float32,bfloat16 --json "$OUT/bench_cuda.json"
# LaCT at the 760M shapes, fresh process per row: manual vs autograd (add --reference PATH for the
# reference's path)
$PY -m lact.bench --device cuda --configs 1:8192,1:16384,1:32768,2:8192 --repeats 3 --json "$OUT/lact.json"
# Whole official layers side by side with test-time-training/ttt-lm-pytorch on CUDA, when a checkout is
# named: TTT_LM_PYTORCH=PATH bash scripts/gpu_check.sh
if [ -n "${TTT_LM_PYTORCH:-}" ]; then
    $PY scripts/bench_official.py --device cuda --ref "$TTT_LM_PYTORCH" --batch 1 --rounds 3 --skip-naive \
        --json "$OUT/official_vs_ref.json"
fi
