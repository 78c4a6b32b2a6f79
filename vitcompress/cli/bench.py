"""``vitcompress bench``: FLOPs, accuracy and speed of every method at several budgets."""
import copy
import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from ..evaluation import models
from .arguments import check_device, check_setting, fraction, int_at_least, output_file
from .report import PLOT_EXTENSIONS, format_table, hardware, plot
from .settings import describe, parse_setting

DEFAULT_FLOPS = (0.85, 0.7, 0.55)
#: The methods run when --methods is not given, the registered ones of these: enough to compare merging,
#: pruning and both, while the default job stays under 3 minutes on a 2-core CPU (``--methods all``: every one).
DEFAULT_METHODS = ("tome", "pitome", "zero_tprune", "tofu")
HELP = "accuracy, FLOPs and speed of every method at several budgets (offline)"

DESCRIPTION = """\
FLOPs, accuracy and speed of every token-reduction method at several budgets.

With no arguments it runs offline in a few minutes on a CPU:
  accuracy  the embedded reference model (a small ViT trained on Fashion-MNIST, shipped with the
            package) on its 3,000 shipped test images: top-1 and agreement with the uncompressed model;
  speed     the DeiT-S architecture at 224 px (deit_small_patch16_224) with random weights -- its
            cost does not depend on its weights -- where token reduction pays: images/s as the
            median of interleaved timed runs, with their spread, and the speedup.

--model NAME --data IMAGEFOLDER evaluates a timm model instead (and times that model);
--speed-model chooses the timed model.
"""


def add_arguments(b) -> None:
    """The arguments of ``vitcompress bench``."""
    b.add_argument("--model", default=models.REFERENCE, metavar="NAME",
                   help="'reference' (embedded, offline; default) or a timm model name (needs --data)")
    b.add_argument("--pretrained", action="store_true", help="load the timm model's pretrained weights (needs a network)")
    b.add_argument("--data", metavar="FOLDER", help="ImageFolder of labelled validation images (with --model NAME)")
    b.add_argument("--num-images", type=int_at_least(1, "--num-images 512"), default=None, metavar="N",
                   help="evaluate on at most this many images (default: all)")
    b.add_argument("--methods", nargs="+", metavar="METHOD",
                   help=f"methods to compare, or 'all': every method for ViT-like encoders "
                        f"(default: {' '.join(DEFAULT_METHODS)})")
    b.add_argument("--flops", nargs="+", type=fraction, default=list(DEFAULT_FLOPS), metavar="FRACTION",
                   help="FLOPs targets, fractions of the uncompressed model in (0, 1] (default: %(default)s)")
    b.add_argument("--settings", nargs="+", metavar="SETTING",
                   help="explicit method:budget settings instead, e.g. tome:r=8 pitome:keep=0.9")
    b.add_argument("--batch-size", type=int_at_least(1, "--batch-size 256"), default=256, metavar="N",
                   help="batch size of the accuracy evaluation (default: %(default)s)")
    b.add_argument("--speed-model", default=None, metavar="NAME",
                   help="model timed for speed: a timm name (random weights), 'reference', or 'none' to skip "
                        "timing (default: deit_small_patch16_224 with the reference model, else --model itself)")
    b.add_argument("--speed-batch-size", type=int_at_least(1, "--speed-batch-size 16"), default=16, metavar="N",
                   help="batch size of the timed runs (default: %(default)s)")
    b.add_argument("--runs", type=int_at_least(1, "--runs 5"), default=5, metavar="N",
                   help="interleaved timed runs per model; throughput is their median (default: %(default)s)")
    b.add_argument("--workers", type=int_at_least(0, "--workers 2"), default=2, metavar="N",
                   help="data-loading processes with --data (0: load in the main process; default: %(default)s)")
    b.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    b.add_argument("--device", default=None, metavar="DEVICE", help="cpu or cuda (default: cuda when available, else cpu)")
    b.add_argument("--json", type=output_file(".json"), metavar="FILE", help="write the rows to this .json file")
    b.add_argument("--plot", type=output_file(*PLOT_EXTENSIONS), metavar="FILE",
                   help="draw the plots into this image file (.png, .pdf, .svg or .jpg)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")


def _bench_settings(args) -> List[Tuple[str, str, Dict[str, Any]]]:
    """``(text, method, kwargs)`` of each setting to run, once each, in the order given."""
    from .. import api

    if args.settings:
        texts = args.settings
    else:
        known = api.list_methods("vit")
        methods = args.methods or [m for m in DEFAULT_METHODS if m in known]
        if methods == ["all"]:
            methods = known
        for method in methods:
            if method not in known:
                raise ValueError(f"--methods {method}: unknown; choose from {', '.join(known)} (or all)")
        texts = [f"{m}:flops={f:g}" for m in methods for f in args.flops]
    out = []
    for text in dict.fromkeys(texts):
        method, kwargs = parse_setting(text)
        try:
            check_setting(method, kwargs)
        except (ValueError, TypeError) as err:
            raise ValueError(f"setting {text!r}: {err}") from None
        out.append((text, method, kwargs))
    return out


def _speed_model_name(args) -> Optional[str]:
    if args.speed_model == "none":
        return None
    if args.speed_model:
        return args.speed_model
    return "deit_small_patch16_224" if args.model == models.REFERENCE else args.model


def check_arguments(args, parser) -> None:
    """Check every argument of ``vitcompress bench`` before any model is built (``parser.error``: exit 2)."""
    try:
        models.check_model_name(args.model, args.pretrained)
        if args.model != models.REFERENCE and not args.data:
            raise ValueError(f"--model {args.model} needs --data IMAGEFOLDER (labelled validation images, one "
                             "folder per class) for its accuracy")
        if args.data and not os.path.isdir(args.data):
            raise ValueError(f"--data {args.data}: no such folder; give an ImageFolder (one sub-folder per class)")
        speed = _speed_model_name(args)
        if speed is not None and speed != args.model:
            models.check_model_name(speed)
        args.device = check_device(args.device)
        args.parsed_settings = _bench_settings(args)
    except (ValueError, TypeError) as err:
        parser.error(str(err))


def measure(args) -> List[Dict[str, Any]]:
    """Run ``vitcompress bench`` (arguments already checked); one row per setting, uncompressed first."""
    import torch
    from tqdm.auto import tqdm

    from .. import api
    from ..evaluation.classification import (
        accuracy,
        autocast,
        batches,
        imagefolder_loader,
        predict,
    )
    from ..profile import compare_speed, count_flops

    device = torch.device(args.device)
    settings = args.parsed_settings
    reference = args.model == models.REFERENCE
    loaded = models.load_model(args.model, pretrained=args.pretrained,
                               num_images=args.num_images if reference else 0)
    model = loaded.model.to(device)
    if args.data:
        loader = imagefolder_loader(args.data, model, args.batch_size, args.workers, args.num_images, reference)
        loader_factory = lambda: loader  # noqa: E731
        sample = next(iter(loader))[0][:1]
    else:
        images, labels = loaded.images, loaded.labels
        loader_factory = lambda: batches(images, labels, args.batch_size)  # noqa: E731
        sample = images[:1]
    sample = sample.to(device)

    rows = [{"method": "none", "setting": "uncompressed"}]
    evaluated = {"uncompressed": model}
    for text, method, kwargs in settings:
        evaluated[text] = api.compress(copy.deepcopy(model), method, **kwargs)
        rows.append({"method": method, "setting": describe(kwargs)})

    speed_name = _speed_model_name(args)
    if speed_name == args.model:
        speed_loaded, timed = loaded, evaluated
    elif speed_name is not None:
        torch.manual_seed(0)
        speed_loaded = models.load_model(speed_name, num_images=0)
        base = speed_loaded.model.to(device)
        timed = {"uncompressed": base}
        timed.update((text, api.compress(copy.deepcopy(base), method, **kwargs)) for text, method, kwargs in settings)
    else:
        speed_loaded, timed = None, {}

    progress = tqdm(total=len(evaluated) + len(timed) + (1 if timed else 0), desc="bench", disable=args.quiet)
    base_top = None
    for row, (name, m) in zip(rows, evaluated.items()):
        progress.set_postfix_str(f"accuracy {name}")
        row["gflops"] = count_flops(m, sample) / 1e9
        top, labels = predict(m, loader_factory(), device, amp=args.amp)
        row.update(accuracy(top, labels))
        base_top = top[:, 0] if base_top is None else base_top
        row["agreement"] = (top[:, 0] == base_top).float().mean().item()
        row["images"] = int(labels.numel())
        row["flops_ratio"] = row["gflops"] / rows[0]["gflops"]
        if name != "uncompressed":
            row["tokens_per_layer"] = api.stats(m)["tokens_per_layer"]
        progress.update(1)
    if timed:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn((args.speed_batch_size,) + tuple(speed_loaded.input_size), generator=generator).to(device)
        for row, (name, m) in zip(rows, timed.items()):
            progress.set_postfix_str(f"FLOPs {name} ({models.display_name(speed_name)})")
            row["speed_gflops"] = (row["gflops"] if timed is evaluated else count_flops(m, x[:1]) / 1e9)
            row["speed_flops_ratio"] = row["speed_gflops"] / rows[0]["speed_gflops"]
            if name != "uncompressed":
                row["speed_tokens_per_layer"] = api.stats(m)["planned_tokens_per_layer"]
            progress.update(1)
        progress.set_postfix_str(f"timing {len(timed)} models x {args.runs} interleaved runs")
        with autocast(device, args.amp):
            speed = compare_speed(timed, x, warmup=1, runs=args.runs, latency=False, memory=False)
        progress.update(1)
        base_speed = speed["uncompressed"]["throughput"]
        for row, name in zip(rows, timed):
            s = speed[name]
            row.update(
                speed_model=speed_name, speed_weights=speed_loaded.weights, speed_batch_size=args.speed_batch_size,
                speed_runs=args.runs, device=str(device), threads=torch.get_num_threads(),
                images_per_s=s["throughput"], images_per_s_min=s["throughput_min"],
                images_per_s_max=s["throughput_max"], images_per_s_q1=s["throughput_q1"],
                images_per_s_q3=s["throughput_q3"], images_per_s_runs=s["throughput_runs"],
                speedup=s["throughput"] / base_speed, ideal_speedup=1.0 / row["speed_flops_ratio"],
                speed_conditions=s["conditions"], timing_warning=s["timing_warning"])
    progress.close()
    return rows


def run(args) -> int:
    """``vitcompress bench`` (arguments already checked): measure, print the table, write the JSON
    and the plot."""
    import torch

    start = time.perf_counter()
    rows = measure(args)
    print(format_table(rows, args.model))
    print(f"({time.perf_counter() - start:.0f} s; {hardware(args.device)}, torch {torch.__version__})")
    if "speed_conditions" in rows[0]:
        from ..profile.conditions import describe_conditions

        print(f"speed measured on {describe_conditions(rows[0]['speed_conditions'])}")
        if rows[0]["timing_warning"]:
            print(f"WARNING: {rows[0]['timing_warning']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        plot(rows, args.plot, args.model)
    return 0
