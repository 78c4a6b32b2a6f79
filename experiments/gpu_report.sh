#!/usr/bin/env bash
# Every GPU figure of the README in one prepared run (issue 13), into one log under
# experiments/results/. Needs a CUDA device and vitcompress installed (pip install -e .[dev]).
#
#     bash experiments/gpu_report.sh [LOG]          # default experiments/results/gpu_<date>.log
#     FULL=1 bash experiments/gpu_report.sh         # + the whole GPU test files and ViT-B compiled
#     VITCOMPRESS_OFFICIAL_DIR=/path bash ...       # + official ToMe side by side (fetched outside
#                                                   #   this repository, see compare_official.py)
#
# Steps, most important first, each time-boxed (estimates for one H200 and 16 CPU cores; the
# default run is about 9 minutes, FULL=1 about 14):
#   1. the new kernels' parity on the GPU (they are first compiled for it here)          ~1 min
#   2. launches per block, DeiT-S and ViT-B, fp16, Triton (auto) and torch references    ~0.5 min
#   3. kernel benchmarks: every primitive, fp16 and fp32, against its torch reference    ~1 min
#   4. every ViT method, fp16 batch 256, DeiT-S and ViT-B: eager and CUDA graphs          ~2.5 min
#   5. the same compiled (torch.compile fullgraph, inductor), the issue's three settings ~3 min
#   6. Zero-TPrune's breakdown at fp16 batch 128 (the 0.13x case) and batch 256 graphs    ~0.5 min
#   7. official ToMe next to ours (only with VITCOMPRESS_OFFICIAL_DIR)                   ~0.5 min
#   8. FULL=1: tests/test_kernels.py and tests/test_gpu_path.py on the GPU               ~3 min
# A step that fails or runs out of time is reported in the log and the rest still run.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
mkdir -p "$here/results"
log="${1:-$here/results/gpu_$(date +%Y%m%d_%H%M).log}"
full="${FULL:-0}"
aims="tome:r=13 pitome:flops=0.653 zero_tprune:flops=0.653"
settings="tome:r=13 tome:flops=0.653 pitome:keep=0.9 pitome:flops=0.653 zero_tprune:flops=0.653"

step() {  # step SECONDS command...
    local limit="$1"; shift
    echo "== $* (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ]; then echo "!! ran out of time after ${limit}s: $*"
    elif [ $rc -ne 0 ]; then echo "!! failed with exit status $rc: $*"; fi
    echo "   ($((SECONDS - t0)) s)"
}

{
    cd "$root" || exit 1
    python -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader 2>/dev/null

    step 240 python -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
        -k "apply_plan or rank_plan or pagerank_scores or index_rows or forced_on or dispatch"
    step 240 python -m pytest -q -x -p no:cacheprovider tests/test_gpu_path.py \
        -k "never_syncs or launch_counts or stays_half or calls_the_kernels"

    for model in deit_small_patch16_224 vit_base_patch16_224; do
        step 90 python experiments/count_launches.py --device cuda --dtype float16 --batch-size 8 --kernels auto \
            --model "$model" $settings
        step 90 python experiments/count_launches.py --device cuda --dtype float16 --batch-size 8 --kernels torch \
            --model "$model" $aims
    done

    step 240 python experiments/bench_kernels.py --runs 5 --batch-size 64 --model-dtype float16 \
        --models deit_small_patch16_224 --settings $aims

    for model in deit_small_patch16_224 vit_base_patch16_224; do
        for mode in "" "--cuda-graph"; do
            step 150 python experiments/bench_speed.py --device cuda --dtype float16 --batch-size 256 --runs 5 \
                --model "$model" $mode $settings
        done
    done
    compiled_models="deit_small_patch16_224"
    [ "$full" = 1 ] && compiled_models="deit_small_patch16_224 vit_base_patch16_224"
    for model in $compiled_models; do
        step 420 python experiments/bench_speed.py --device cuda --dtype float16 --batch-size 256 --runs 5 \
            --model "$model" --torchcompile $aims
    done

    step 120 python experiments/bench_zero_tprune.py --device cuda --dtype float16 --batch-size 128 --runs 5 --breakdown
    step 120 python experiments/bench_zero_tprune.py --device cuda --dtype float16 --batch-size 256 --runs 5 \
        --breakdown --cuda-graph

    if [ -n "${VITCOMPRESS_OFFICIAL_DIR:-}" ]; then
        step 240 python - <<'EOF'
# official ToMe (facebookresearch/ToMe, loaded by path from $VITCOMPRESS_OFFICIAL_DIR) next to
# vitcompress tome, same GPU, fp16 batch 256, eager and CUDA graphs
import copy, os, sys
import timm, torch
sys.path.insert(0, "experiments")
import vitcompress
from compare_official import load_official, official_tome
off = load_official(os.environ["VITCOMPRESS_OFFICIAL_DIR"])
for name in ("deit_small_patch16_224", "vit_base_patch16_224"):
    torch.manual_seed(0)
    base = timm.create_model(name).eval()
    ours = vitcompress.compress(copy.deepcopy(base), "tome", r=13)
    theirs = official_tome(copy.deepcopy(base), off, 13)
    models = {k: m.cuda().half() for k, m in {"base": base, "vitcompress": ours, "official": theirs}.items()}
    x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.float16)
    for graphs in (False, True):
        speed = vitcompress.compare_speed(models, x, runs=5, latency=False, memory=False, cuda_graph=graphs)
        base_tp = speed["base"]["throughput"]
        print(f"{name} tome r=13 fp16 b256 {'CUDA graphs' if graphs else 'eager'}: base {base_tp:.0f} img/s; "
              + "; ".join(f"{k} {speed[k]['throughput']:.0f} img/s ({speed[k]['throughput'] / base_tp:.2f}x)"
                          for k in ("vitcompress", "official")))
EOF
    else
        echo "== official ToMe: skipped (set VITCOMPRESS_OFFICIAL_DIR to a folder holding ToMe/, see compare_official.py)"
    fi

    if [ "$full" = 1 ]; then
        step 420 python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_gpu_path.py
    fi
    echo "== done"
} 2>&1 | tee "$log"
