"""Counted FLOPs vs measured throughput of compressed timm ViTs, in one run.

    python experiments/benchmarks/bench_speed.py --model deit_small_patch16_224 --batch-size 32 \
        tome:r=8 tome:r=13 pitome:keep=0.9 pitome:keep=0.85

Random weights are fine for speed. For every setting it prints the counted GFLOPs (fvcore), the
throughput of the compressed and the uncompressed model measured interleaved in the same run,
the speedup, the ideal speedup implied by the FLOPs ratio and their quotient (efficiency).
"""
import argparse
import copy

import timm
import torch

import vitcompress
from vitcompress.cli.settings import describe, parse_setting

DEFAULT_SETTINGS = ["tome:r=8", "tome:r=13", "pitome:keep=0.9", "pitome:keep=0.85", "pitome:flops=0.6"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="*", default=DEFAULT_SETTINGS, help="method:budget, e.g. tome:r=8")
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (no Python launch cost)")
    ap.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="time torch.compile'd models (backend: inductor)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = timm.create_model(args.model).eval()
    size = base.patch_embed.img_size
    x = torch.randn(args.batch_size, 3, *size)
    base_flops = vitcompress.count_flops(base, x[:1])
    models, rows = {"base": base}, []
    for text in args.settings:
        method, kwargs = parse_setting(text)
        model = vitcompress.compress(copy.deepcopy(base), method, **kwargs)
        name = f"{method} {describe(kwargs)}"
        models[name] = model
        rows.append((name, vitcompress.count_flops(model, x[:1])))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    models = {name: m.to(device, dtype) for name, m in models.items()}
    if args.torchcompile:
        models = {name: torch.compile(m, backend=args.torchcompile, fullgraph=True) for name, m in models.items()}
    speed = vitcompress.compare_speed(models, x.to(device, dtype), runs=args.runs, latency=False, memory=False,
                                        cuda_graph=args.cuda_graph)
    base_tp = speed["base"]["throughput"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.model}, batch {args.batch_size}, {args.dtype}, {where}, {args.runs} interleaved runs"
          f"{', CUDA graphs' if args.cuda_graph else ''}{', torch.compile ' + args.torchcompile if args.torchcompile else ''}")
    print(f"{'setting':<24}{'GFLOPs':>8}{'% base':>8}{'img/s':>9}{'speedup':>9}{'ideal':>7}{'effic.':>8}")
    print(f"{'uncompressed':<24}{base_flops / 1e9:>8.2f}{100:>8.1f}{base_tp:>9.1f}{1:>9.2f}{1:>7.2f}{1:>8.2f}")
    for name, flops in rows:
        speedup = speed[name]["throughput"] / base_tp
        ideal = base_flops / flops
        print(f"{name:<24}{flops / 1e9:>8.2f}{100 * flops / base_flops:>8.1f}{speed[name]['throughput']:>9.1f}"
              f"{speedup:>9.2f}{ideal:>7.2f}{speedup / ideal:>8.2f}")


if __name__ == "__main__":
    main()
