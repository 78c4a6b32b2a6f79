"""``vitcompress bench``: FLOPs, throughput and accuracy of every method at several budgets.

With no arguments it runs offline on the embedded reference model (a small ViT trained on
Fashion-MNIST, shipped with the package) and its shipped test images.
"""
import argparse
import copy
import json
import sys
import time
from typing import Any, Dict, List

import torch
from tqdm.auto import tqdm

from . import api
from .evaluate import accuracy, autocast, batches, imagefolder_loader, predict
from .profile import compare_speed, count_flops
from .settings import describe, parse_setting

DEFAULT_FLOPS = (0.85, 0.7, 0.55)


def _load(args):
    """(model, loader factory, one input batch for speed) for the reference model or a timm model."""
    reference_model = args.model == "reference"
    if reference_model:
        if args.pretrained:
            sys.exit("bench: --pretrained applies to timm models; the reference model ships its own weights")
        from . import reference_model as reference
        model, images, labels = reference.load(num_images=args.num_images)
        if not args.data:
            return model, (lambda: batches(images, labels, args.batch_size)), images[: args.batch_size]
    else:
        import timm
        try:
            model = timm.create_model(args.model, pretrained=args.pretrained).eval()
        except Exception as err:  # hub unreachable, unknown name, ...
            sys.exit(f"bench: cannot create timm model {args.model!r}: {err}")
        if not args.data:
            sys.exit("bench: --model NAME needs --data IMAGEFOLDER (labelled validation images) for accuracy")
    loader = imagefolder_loader(args.data, model, args.batch_size, args.workers, args.num_images, reference_model)
    first = next(iter(loader))[0]
    return model, (lambda: loader), first


def _settings(args) -> List[str]:
    """The settings to run, each once, in the order given."""
    if args.settings:
        settings = args.settings
    else:
        methods = args.methods or api.list_methods("vit")
        settings = [f"{m}:flops={f}" for m in methods for f in args.flops]
    return list(dict.fromkeys(settings))


def bench(args) -> List[Dict[str, Any]]:
    device = torch.device(args.device)
    model, loader, sample = _load(args)
    model.to(device)
    sample = sample.to(device)
    settings = _settings(args)
    models, rows = {"uncompressed": model}, [{"method": "none", "setting": "uncompressed"}]
    for text in settings:
        method, kwargs = parse_setting(text)
        models[text] = api.compress(copy.deepcopy(model), method, **kwargs)
        rows.append({"method": method, "setting": describe(kwargs)})

    progress = tqdm(total=2 * len(models) + 1, desc="bench", disable=args.quiet)
    base_top = None
    for row, (name, m) in zip(rows, models.items()):
        progress.set_postfix_str(name)
        row["gflops"] = count_flops(m, sample[:1]) / 1e9
        top, labels = predict(m, loader(), device, amp=args.amp)
        row.update(accuracy(top, labels))
        base_top = top[:, 0] if base_top is None else base_top
        row["agreement"] = (top[:, 0] == base_top).float().mean().item()
        if name != "uncompressed":
            row["tokens_per_layer"] = api.stats(m)["tokens_per_layer"]
        progress.update(2)
    with autocast(device, args.amp):
        speed = compare_speed(models, sample, warmup=1, runs=args.runs, latency=False, memory=False)
    progress.update(1)
    progress.close()
    base = rows[0]
    for row, name in zip(rows, models):
        row["images_per_s"] = speed[name]["throughput"]
        row["flops_ratio"] = row["gflops"] / base["gflops"]
        row["speedup"] = row["images_per_s"] / speed["uncompressed"]["throughput"]
    return rows


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = f"{'method':<12}{'setting':<14}{'GFLOPs':>9}{'% base':>8}{'img/s':>9}{'speedup':>9}{'top-1':>8}{'agree':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<12}{r['setting']:<14}{r['gflops']:>9.4f}{100 * r['flops_ratio']:>7.1f}%"
                     f"{r['images_per_s']:>9.0f}{r['speedup']:>8.2f}x{100 * r['top1']:>7.2f}%{100 * r['agreement']:>7.1f}%")
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    """Accuracy vs GFLOPs and accuracy vs throughput, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    base = rows[0]
    for ax, key, label in ((axes[0], "gflops", "GFLOPs per image"), (axes[1], "images_per_s", "images / s")):
        for method in dict.fromkeys(r["method"] for r in rows[1:]):
            runs = sorted((r for r in rows if r["method"] == method), key=lambda r: -r["gflops"])  # budget order
            pts = [(base[key], base["top1"])] + [(r[key], r["top1"]) for r in runs]
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=method)
        ax.scatter([base[key]], [100 * base["top1"]], marker="*", s=180, color="black", zorder=3, label="uncompressed")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].set_title("accuracy vs FLOPs")
    axes[1].set_title("accuracy vs throughput")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vitcompress", description="Training-free token reduction for transformers.")
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="FLOPs, images/s and accuracy of every method at several budgets",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--model", default="reference", help="'reference' (embedded, offline) or a timm model name")
    b.add_argument("--pretrained", action="store_true", help="load the timm model's pretrained weights (needs a network)")
    b.add_argument("--data", help="ImageFolder of labelled validation images (with --model NAME)")
    b.add_argument("--num-images", type=int, default=None, help="evaluate on at most this many images")
    b.add_argument("--methods", nargs="+", help="methods to compare (default: every registered ViT method)")
    b.add_argument("--flops", nargs="+", type=float, default=list(DEFAULT_FLOPS),
                   help="FLOPs targets, as fractions of the uncompressed model (default: %(default)s)")
    b.add_argument("--settings", nargs="+", help="explicit method:budget settings instead, e.g. tome:r=8 pitome:keep=0.9")
    b.add_argument("--batch-size", type=int, default=256)
    b.add_argument("--runs", type=int, default=3, help="timed runs per model for throughput")
    b.add_argument("--workers", type=int, default=2)
    b.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--json", help="write the rows to this JSON file")
    b.add_argument("--plot", help="write accuracy-vs-GFLOPs / accuracy-vs-throughput plots to this image file")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    from .export import add_cli_arguments as _export_arguments  # export: its own module
    _export_arguments(sub.add_parser(
        "export", help="export a compressed model to ONNX and check it in onnxruntime against PyTorch",
        description="Export a compressed model to ONNX (dynamic batch), check it with onnx.checker and compare "
                    "onnxruntime with PyTorch: the embedded reference model on its real images by default, "
                    "or --model NAME (timm) on random inputs."))
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "export":
        from .export import run_cli as _export
        return _export(args)
    if args.command == "bench":
        start = time.perf_counter()
        try:
            rows = bench(args)
        except (ValueError, TypeError, FileNotFoundError) as err:
            print(f"vitcompress bench: {err}", file=sys.stderr)
            return 2
        print(format_table(rows))
        print(f"({time.perf_counter() - start:.0f} s; throughput at batch {args.batch_size} on {args.device}, "
              f"{torch.get_num_threads()} threads)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        if args.plot:
            plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
