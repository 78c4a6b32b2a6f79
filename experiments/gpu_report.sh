#!/usr/bin/env bash
# The README's GPU figures in one run: the Triton kernels against their torch references, then
# Zero-TPrune on DeiT-S and every ViT method at the paper budgets, each eager, as CUDA-graph
# replays, and torch.compile'd. Needs a CUDA device and vitcompress installed. A step that fails
# is reported in the log and the rest still run.
#
#     bash experiments/gpu_report.sh [LOG]        # default experiments/results/gpu_<date>.log
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
log="${1:-$here/results/gpu_$(date +%Y%m%d).log}"
settings="tome:r=13 tome:flops=0.653 pitome:keep=0.9 pitome:flops=0.653 zero_tprune:flops=0.653"

step() {
    echo "== $*"
    python "$@" || echo "!! failed with exit status $?: $*"
}

{
    python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
    step "$here/bench_kernels.py" --runs 10
    for mode in "" "--cuda-graph" "--torchcompile" "--torchcompile --cuda-graph"; do
        step "$here/bench_zero_tprune.py" --device cuda --dtype float16 --batch-size 256 --runs 10 --breakdown $mode
        step "$here/bench_speed.py" --device cuda --dtype float16 --batch-size 256 --runs 10 $mode $settings
    done
} 2>&1 | tee "$log"
