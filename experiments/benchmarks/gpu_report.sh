#!/usr/bin/env bash
# Every GPU figure of the README in one prepared run (issue 13), into one log. Needs a CUDA device.
#
#     bash experiments/benchmarks/gpu_report.sh [LOG]       # default experiments/results/gpu_<date>.log
#     DRY_RUN=1 bash experiments/benchmarks/gpu_report.sh   # print the steps and their time limits, run nothing
#     FULL=1 bash experiments/benchmarks/gpu_report.sh      # + every GPU test (slow ones too) and ViT-B compiled
#     BUDGET=540 bash experiments/benchmarks/gpu_report.sh  # seconds for the whole run (default 540)
#
# Official ToMe (and PiToMe) run side by side when VITCOMPRESS_OFFICIAL_DIR names a folder holding
# ToMe/ and PiToMe/ (see experiments/studies/compare_official.py), fetched outside this repository and never
# committed; ./out/official (git-ignored) is used when it exists. On a machine whose command gets
# only this working tree, e.g. `cp -r /path/to/official out/official` first and carry out/official,
# and write the log where it comes back: `bash experiments/benchmarks/gpu_report.sh "$OUT/gpu.log"`; then
# commit it under experiments/results/.
#
# Steps, most important first. Each has its own time limit, cut to what is left of BUDGET, so the
# whole run ends within BUDGET seconds (under a 10-minute limit per command) with the log complete
# up to there; a step that fails or runs out of time is reported and the rest still run.
# Estimates for one H200 and 16 CPU cores (the default run about 8-9 minutes):
#   1. the kernels' parity tests and the GPU-path tests (no-sync with sync debug mode "error",
#      half precision, launch counts, compile with the custom ops) on the GPU         ~1.5 min
#   2. launches per block, DeiT-S and ViT-B, fp16, kernels (auto) and torch references ~0.5 min
#   3. every ViT method, fp16 batch 256, DeiT-S and ViT-B: eager and CUDA graphs       ~2.5 min
#   3b. the ViT baselines (evit, tofu, mctf, ppt, atc, tome) at flops=0.7, DeiT-S fp16   ~0.5 min
#   4. official ToMe next to ours, eager and CUDA graphs (with VITCOMPRESS_OFFICIAL_DIR) ~0.5 min
#   5. Zero-TPrune at fp16 batch 128 (the old 0.13x case), eager and CUDA graphs       ~0.5 min
#   6. kernel benchmarks: every primitive, fp16 and fp32, against its torch reference  ~1 min
#   7. the issue's three settings compiled (torch.compile fullgraph, inductor), DeiT-S ~2 min
#   8. FULL=1: the slow GPU tests and ViT-B compiled
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
log="${1:-$root/experiments/results/gpu_$(date +%Y%m%d_%H%M).log}"
mkdir -p "$(dirname "$log")"
full="${FULL:-0}"
dry="${DRY_RUN:-0}"
budget="${BUDGET:-540}"
aims="tome:r=13 pitome:flops=0.653 zero_tprune:flops=0.653"
baselines="evit:flops=0.7 tofu:flops=0.7 mctf:flops=0.7 ppt:flops=0.7 atc:flops=0.7 tome:flops=0.7"
settings="tome:r=13 tome:flops=0.653 pitome:keep=0.9 pitome:flops=0.653 zero_tprune:flops=0.653"
if [ -z "${VITCOMPRESS_OFFICIAL_DIR:-}" ] && [ -d "$root/out/official/ToMe" ]; then
    export VITCOMPRESS_OFFICIAL_DIR="$root/out/official"
fi

limits=0  # the sum of the steps' limits (DRY_RUN prints it)
step() {  # step SECONDS command...: run it within SECONDS and what is left of the budget
    local limit="$1"; shift
    local left=$((budget - SECONDS))
    [ "$limit" -gt "$left" ] && limit="$left"
    if [ "$limit" -lt 20 ]; then echo "!! skipped, budget spent: $*"; return; fi
    echo "== $* (limit ${limit}s, ${SECONDS}s into the run)"
    limits=$((limits + limit))
    if [ "$dry" = 1 ]; then return; fi
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ]; then echo "!! ran out of time after ${limit}s: $*"
    elif [ $rc -ne 0 ]; then echo "!! failed with exit status $rc: $*"; fi
    echo "   ($((SECONDS - t0)) s)"
}

{
    cd "$root" || exit 1
    if [ "$dry" = 1 ]; then
        echo "DRY_RUN: the steps and their limits (budget ${budget}s); nothing runs"
    else
        here_tree='import os, sys, vitcompress.kernels as k; sys.exit(not os.path.realpath(k.__file__).startswith(os.getcwd()))'
        python -c "$here_tree" 2>/dev/null \
            || pip install -q --no-deps --no-build-isolation -e . \
            || { echo "!! vitcompress from this tree is not importable and could not be installed"; exit 1; }
        versions='import torch, triton, timm, vitcompress as v
print("vitcompress", v.__version__, "torch", torch.__version__, "triton", triton.__version__, "timm", timm.__version__)
print(torch.cuda.get_device_name())'
        python -c "$versions" || { echo "!! no CUDA device or missing packages"; exit 1; }
        nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader 2>/dev/null
        git log -1 --format="commit %h %s" 2>/dev/null; git status --short 2>/dev/null | head -20
    fi

    step 150 python -m pytest -q --maxfail=5 -p no:cacheprovider tests/test_kernels.py tests/test_gpu_path.py

    for model in deit_small_patch16_224 vit_base_patch16_224; do
        step 60 python experiments/benchmarks/count_launches.py --device cuda --dtype float16 --batch-size 8 --kernels auto \
            --model "$model" $settings
    done
    step 60 python experiments/benchmarks/count_launches.py --device cuda --dtype float16 --batch-size 8 --kernels torch \
        --model deit_small_patch16_224 $aims

    for model in deit_small_patch16_224 vit_base_patch16_224; do
        which="$settings"
        [ "$model" = vit_base_patch16_224 ] && which="$aims"
        for mode in "" "--cuda-graph"; do
            step 90 python experiments/benchmarks/bench_speed.py --device cuda --dtype float16 --batch-size 256 --runs 5 \
                --model "$model" $mode $which
        done
    done

    # issue 26: the ViT baselines at one FLOPs target, ATC's sequential clustering among them, eager only
    step 60 python experiments/benchmarks/bench_speed.py --device cuda --dtype float16 --batch-size 256 --runs 5 \
        --model deit_small_patch16_224 $baselines

    if [ -n "${VITCOMPRESS_OFFICIAL_DIR:-}" ]; then
        step 120 python - official-tome-side-by-side <<'EOF'
# official ToMe (facebookresearch/ToMe, loaded by path from $VITCOMPRESS_OFFICIAL_DIR) next to
# vitcompress tome, r=13, same GPU, fp16 batch 256, eager and CUDA graphs.
# GR_DEVICE / GR_BATCH / GR_MODELS / GR_GRAPHS override the device, batch, models and modes (CPU check).
import copy, os, runpy
import timm, torch
import vitcompress
official_code = runpy.run_path("experiments/studies/compare_official.py")  # by path: experiments is no package
load_official, official_tome = official_code["load_official"], official_code["official_tome"]
off = load_official(os.environ["VITCOMPRESS_OFFICIAL_DIR"])
print("official ToMe:", off.commits["ToMe"])
device, batch = os.environ.get("GR_DEVICE", "cuda"), int(os.environ.get("GR_BATCH", "256"))
graphs_modes = [m == "1" for m in os.environ.get("GR_GRAPHS", "0,1").split(",")]
for name in os.environ.get("GR_MODELS", "deit_small_patch16_224,vit_base_patch16_224").split(","):
    torch.manual_seed(0)
    base = timm.create_model(name).eval()
    ours = vitcompress.compress(copy.deepcopy(base), "tome", r=13)
    theirs = official_tome(copy.deepcopy(base), off, 13)
    models = {k: m.to(device, torch.float16) for k, m in {"base": base, "vitcompress": ours, "official": theirs}.items()}
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=torch.float16)
    with torch.inference_mode():
        diff = (models["vitcompress"](x[:8]).float() - models["official"](x[:8]).float()).abs().max().item()
    for graphs in graphs_modes:
        speed = vitcompress.compare_speed(models, x, runs=5, latency=False, memory=False, cuda_graph=graphs)
        base_tp = speed["base"]["throughput"]
        print(f"{name} tome r=13 fp16 b{batch} {'CUDA graphs' if graphs else 'eager'}: base {base_tp:.0f} img/s; "
              + "; ".join(f"{k} {speed[k]['throughput']:.0f} img/s ({speed[k]['throughput'] / base_tp:.2f}x)"
                          for k in ("vitcompress", "official"))
              + f"; max |vitcompress - official| {diff:.1e} (fp16 logits)")
EOF
    else
        echo "== official ToMe: skipped (set VITCOMPRESS_OFFICIAL_DIR to a folder holding ToMe/ and PiToMe/)"
    fi

    step 60 python experiments/benchmarks/bench_zero_tprune.py --device cuda --dtype float16 --batch-size 128 --runs 5 --breakdown
    step 60 python experiments/benchmarks/bench_zero_tprune.py --device cuda --dtype float16 --batch-size 128 --runs 5 \
        --breakdown --cuda-graph

    step 90 python experiments/benchmarks/bench_kernels.py --runs 5 --batch-size 64 --model-dtype float16 \
        --models deit_small_patch16_224 --settings $aims

    compiled_models="deit_small_patch16_224"
    [ "$full" = 1 ] && compiled_models="deit_small_patch16_224 vit_base_patch16_224"
    for model in $compiled_models; do
        step 240 python experiments/benchmarks/bench_speed.py --device cuda --dtype float16 --batch-size 256 --runs 5 \
            --model "$model" --torchcompile $aims
    done

    if [ "$full" = 1 ]; then
        step 420 python -m pytest -q -p no:cacheprovider -m slow tests/test_kernels.py tests/test_gpu_path.py
    fi
    if [ "$dry" = 1 ]; then echo "== dry run: the limits add up to ${limits}s; a run stops at ${budget}s"
    else echo "== done in ${SECONDS}s"; fi
} 2>&1 | tee "$log"
