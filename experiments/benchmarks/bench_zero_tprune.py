"""Zero-TPrune on DeiT-S: counted FLOPs, throughput against the uncompressed model, scoring cost.

    python experiments/benchmarks/bench_zero_tprune.py                       # deit_small, flops=0.653, batch 32
    python experiments/benchmarks/bench_zero_tprune.py --batch-size 8 --runs 5 --device cpu --breakdown
    python experiments/benchmarks/bench_zero_tprune.py --torchcompile       # both models torch.compile'd

Prints the base and compressed GFLOPs (fvcore, ``vitcompress.profile.count_flops``), the
throughput of both models measured in one interleaved run (median of ``--runs`` timed rounds
after ``--warmup``), the speedup against the ideal one implied by the FLOPs ratio, and the share
of the compressed forward spent in the Zero-TPrune scoring (all plan() calls, and the weighted
PageRank iterations within them), timed in separate passes with synchronised timers.
Random weights: the speed of a model does not depend on its weights.
"""
import argparse
import copy
import importlib
import statistics
import sys
import time

import timm
import torch

import vitcompress
from vitcompress.methods import REGISTRY
from vitcompress.interfaces import ViTMethod as Method
from vitcompress.profile import compare_speed, count_flops
from vitcompress.engine.tokens import Plan

zt = importlib.import_module("vitcompress.methods.zero_tprune")  # vitcompress.methods is also a function


_clock = time.perf_counter  # --clock cpu switches to the process's CPU time


def interleaved_cpu_time(models, x, warmup: int, runs: int):
    """Like ``compare_speed`` but timed by the process's CPU time (single-threaded CPU runs):
    on a shared machine other processes then only slow a forward through caches and memory."""
    names = list(models)
    for _ in range(warmup):
        for name in names:
            with torch.inference_mode():
                models[name](x)
    times = {n: [] for n in names}
    for i in range(runs):
        for name in names[i % len(names):] + names[: i % len(names)]:
            start = _clock()
            with torch.inference_mode():
                models[name](x)
            times[name].append(_clock() - start)
    return {n: {"throughput": x.shape[0] / statistics.median(t), "seconds": t} for n, t in times.items()}


class _SameSchedule(Method):
    """The compressed model's schedule without any scoring: keeps the first tokens. With
    ``probs`` it still materialises attention probabilities where Zero-TPrune does."""

    kind = "prune"
    defaults = {}

    def __init__(self, name, probs):
        self.name, self.probs = name, probs

    def max_remove(self, tokens, layer, num_layers, options):
        return tokens - 1

    def needs_attention(self, layer, num_layers, options):
        return self.probs

    def plan(self, signals, remove, options):
        B, T = signals.metric.shape[:2]
        return Plan(keep=torch.arange(T - remove, device=signals.metric.device).expand(B, T - remove))


class _Timer:
    """Accumulates the wall time of the calls it wraps (synchronising CUDA around each)."""

    def __init__(self, device):
        self.device, self.total = device, 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = _clock()
            out = fn(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.total += _clock() - start
            return out
        return timed


class _TimedMethod:
    """Delegates to the compressed model's method, timing ``plan``."""

    def __init__(self, method, timer):
        self._method, self._timer = method, timer
        self.plan = timer.wrap(method.plan)

    def __getattr__(self, name):
        return getattr(self._method, name)


def scoring_share(model, x, runs: int):
    """Median over ``runs`` forwards of (forward seconds, plan() seconds, PageRank seconds)."""
    runtime = model._vitcompress
    plan_timer, wpr_timer = _Timer(x.device), _Timer(x.device)
    # PageRank runs through weighted_pagerank (restricted graphs) or the fused dispatch.pagerank_scores
    method, wpr, fused = runtime.method, zt.weighted_pagerank, zt.dispatch.pagerank_scores
    runtime.method = _TimedMethod(method, plan_timer)
    zt.weighted_pagerank, zt.dispatch.pagerank_scores = wpr_timer.wrap(wpr), wpr_timer.wrap(fused)
    rows = []
    try:
        for _ in range(runs):
            plan_timer.total = wpr_timer.total = 0.0
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            start = _clock()
            with torch.inference_mode():
                model(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            rows.append((_clock() - start, plan_timer.total, wpr_timer.total))
    finally:
        runtime.method, zt.weighted_pagerank, zt.dispatch.pagerank_scores = method, wpr, fused
    return tuple(statistics.median(r[i] for r in rows) for i in range(3))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--flops", type=float, default=0.653, help="target fraction of the uncompressed FLOPs")
    p.add_argument("--s-ratio", type=float, default=None,
                   help="zero_tprune's s_ratio (default: the library's, 1.0; 0.5 = the even split of 0.2.0)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--share-runs", type=int, default=2, help="forwards timed for the scoring share")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (no Python launch cost)")
    p.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="time torch.compile'd models (backend: inductor); the scoring share is timed eagerly")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time (vitcompress.profile.compare_speed); cpu: the process's CPU time, "
                        "for a single-threaded CPU run on a machine shared with other jobs (implies --threads 1)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the same token schedule without scoring, with and without materialised "
                        "attention probabilities (where the gap to the ideal speedup goes)")
    args = p.parse_args(argv)
    if args.clock == "cpu":
        global _clock
        _clock, args.threads = time.process_time, 1
        if args.device != "cpu":
            p.error("--clock cpu measures CPU time: use it with --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = timm.create_model(args.model, img_size=args.img_size).eval()
    options = {} if args.s_ratio is None else {"s_ratio": args.s_ratio}
    pruned = vitcompress.compress(copy.deepcopy(base), "zero_tprune", flops=args.flops, **options)
    one = torch.randn(1, 3, args.img_size, args.img_size)
    base_flops, pruned_flops = count_flops(base, one), count_flops(pruned, one)
    st = vitcompress.stats(pruned)

    models = {"base": base, "zero_tprune": pruned}
    if args.breakdown:
        for name, probs in (("schedule_only_probs", True), ("schedule_only_sdpa", False)):
            REGISTRY[name] = _SameSchedule(name, probs)
            models[name] = vitcompress.compress(copy.deepcopy(base), name, r=list(st["schedule"]))
    models = {k: m.to(device, dtype) for k, m in models.items()}
    eager_pruned = models["zero_tprune"]
    if args.torchcompile:
        models = {k: torch.compile(m, backend=args.torchcompile, fullgraph=True) for k, m in models.items()}
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    if args.clock == "cpu":
        speed = interleaved_cpu_time(models, x, args.warmup, args.runs)
    else:
        speed = compare_speed(models, x, warmup=args.warmup, runs=args.runs, latency=False, memory=False,
                              cuda_graph=args.cuda_graph)
    forward, plan, wpr = scoring_share(eager_pruned, x, args.share_runs)

    ratio = pruned_flops / base_flops
    ideal = base_flops / pruned_flops
    speedup = speed["zero_tprune"]["throughput"] / speed["base"]["throughput"]
    print(f"model {args.model}  img {args.img_size}  batch {args.batch_size}  device {device} "
          f"({torch.get_num_threads()} threads)  dtype {args.dtype}  torch {torch.__version__}")
    print(f"schedule (tokens removed per block): {st['schedule']}  keep={st['keep']}")
    print(f"tokens per block: {st['planned_tokens_per_layer']}")
    print(f"GFLOPs   base {base_flops / 1e9:.3f}  zero_tprune {pruned_flops / 1e9:.3f}  "
          f"ratio {ratio:.4f} (target {args.flops}, {100 * (1 - ratio):.1f}% fewer)")
    print(f"throughput  base {speed['base']['throughput']:.1f} img/s  zero_tprune "
          f"{speed['zero_tprune']['throughput']:.1f} img/s  (median of {args.runs} interleaved runs, "
          f"{'CUDA-graph replays' if args.cuda_graph else args.clock + ' clock'}"
          f"{', torch.compile ' + args.torchcompile if args.torchcompile else ''})")
    print(f"speedup {speedup:.3f}x (+{100 * (speedup - 1):.1f}%)  ideal {ideal:.3f}x  "
          f"achieved/ideal {speedup / ideal:.3f}  (gain achieved/ideal {(speedup - 1) / (ideal - 1):.3f})")
    for name in models:
        if name.startswith("schedule_only"):
            what = "materialised attention" if name.endswith("probs") else "fused SDPA"
            print(f"same schedule, no scoring, {what}: {speed[name]['throughput']:.1f} img/s "
                  f"({speed[name]['throughput'] / speed['base']['throughput']:.3f}x)")
    print(f"scoring share of the {'eager ' if args.torchcompile else ''}compressed forward: plan() {100 * plan / forward:.1f}%  "
          f"of which weighted PageRank {100 * wpr / forward:.1f}%  "
          f"(forward {1000 * forward:.1f} ms, plan {1000 * plan:.1f} ms, PageRank {1000 * wpr:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
