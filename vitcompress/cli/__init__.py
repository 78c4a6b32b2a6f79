"""The command line: ``vitcompress bench`` and ``vitcompress export``.

Every argument is checked before any model is built: a bad one ends the command at once with a
one-line error naming the fix and exit code 2 (argparse's).
"""
import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..evaluation import models
from .settings import BUDGET_KEYS

DEFAULT_FLOPS = (0.85, 0.7, 0.55)
PLOT_EXTENSIONS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")

BENCH_DESCRIPTION = """\
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

EXPORT_DESCRIPTION = """\
Export a compressed model to ONNX (dynamic batch), check it with onnx.checker and compare
onnxruntime (or --runtime openvino) with PyTorch: the embedded reference model on its real images
by default, or --model NAME (timm) on random inputs. --quantize int8 writes an int8 file (linear
layers only; token selection stays in float) judged by top-1 agreement with the fp32 model.
Needs pip install "vitcompress[export]" (OpenVINO: "vitcompress[edge]").
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors on one line: ``vitcompress bench: error: ... (see --help)``."""

    def error(self, message: str):
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message}\n")


# --------------------------------------------------------------------------- argument types


def _int_at_least(minimum: int, example: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give e.g. {example}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}; give e.g. {example}")
        return value
    parse.__name__ = "int"
    return parse


def _fraction(text: str) -> float:
    """A fraction in (0, 1] (keep= / flops= budgets)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction in (0, 1], e.g. 0.7") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is outside (0, 1]: it is a fraction of the uncompressed "
                                         "model, e.g. 0.7")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give e.g. 1e-4") from None
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}; give e.g. 1e-4")
    return value


def check_output_file(path: str, extensions: Sequence[str]) -> str:
    """Refuse, before any work, an output file that could not be written: an unknown extension, a
    missing or read-only folder, a folder given as the file. Creates nothing. Returns ``path``."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ValueError(f"{path} is a folder; give the file to write, e.g. "
                         f"{os.path.join(path, 'out' + extensions[0])}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
        raise ValueError(f"{path}: unknown file type {ext or '(no extension)'!r}; give a file ending in "
                         f"{' / '.join(extensions)}")
    folder = os.path.dirname(target)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{path}: {folder} is a file, not a folder; choose another path")
    if not os.path.isdir(folder):
        raise ValueError(f"{path}: folder {folder} does not exist; create it first (mkdir -p {folder}) or "
                         "choose another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise ValueError(f"{path}: not writable here; choose a path in a folder you can write to")
    return path


def _output_file(*extensions: str):
    def parse(text: str) -> str:
        try:
            return check_output_file(text, extensions)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = "path"
    return parse


def check_device(text: Optional[str]) -> str:
    """The device to run on: ``cuda`` when available, else ``cpu``, for ``None``; an unavailable or
    unknown device raises ``ValueError`` naming the fix."""
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a device; give cpu or cuda (cuda:1 for the second GPU)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {text}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: only {torch.cuda.device_count()} GPU(s) visible; use cuda:0")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {text}: MPS is not available; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {text}: vitcompress bench runs on cpu, cuda or mps")
    return text


def parse_budget_text(text: Optional[str], name: str = "--r"):
    """``"8"`` / ``"[8,8,4]"`` / ``"(8,-0.5)"`` -> the Python value; ``ValueError`` naming the forms."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"{name} {text!r}: give an int, a list like [8,8,4] or a tuple like (8,-0.5)") from None


def check_setting(method: str, kwargs: Dict[str, Any], exportable: bool = False) -> None:
    """Check a method name, its options and its budget without a model; ``ValueError`` /
    ``TypeError`` naming the fix."""
    from .. import api
    from ..engine.schedule import parse_budget
    from ..methods import get

    spec = get(method)
    if spec.target != "vit":
        raise ValueError(f"{method} reduces {spec.target} models; this command runs the methods for ViT-like "
                         f"image encoders: {', '.join(api.list_methods('vit'))}")
    if exportable and getattr(spec, "dynamic", False):
        raise ValueError(f"{method} sets its token counts from the content of each image and cannot be exported "
                         "as a static graph; choose " + ", ".join(
                             n for n in api.list_methods("vit") if not getattr(get(n), "dynamic", False)))
    budget = {k: kwargs[k] for k in BUDGET_KEYS if k in kwargs}
    options = {k: v for k, v in kwargs.items() if k not in BUDGET_KEYS}
    parse_budget(spec, **budget)
    api.resolve_options(spec, options)  # unknown options and bad values, as compress() checks them


# --------------------------------------------------------------------------- bench


def _bench_settings(args) -> List[Tuple[str, str, Dict[str, Any]]]:
    """``(text, method, kwargs)`` of each setting to run, once each, in the order given."""
    from .. import api
    from .settings import parse_setting

    if args.settings:
        texts = args.settings
    else:
        for method in args.methods or []:
            if method not in api.list_methods("vit"):
                raise ValueError(f"--methods {method}: unknown; choose from {', '.join(api.list_methods('vit'))}")
        texts = [f"{m}:flops={f:g}" for m in (args.methods or api.list_methods("vit")) for f in args.flops]
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


def _check_bench(args, parser) -> None:
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


def hardware(device: str = "cpu", threads: Optional[int] = None) -> str:
    """``"Intel(R) Xeon(R) ..., 2 threads"`` (CPU model name and ``threads``, by default torch's thread
    count), or the GPU's name."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "CPU"
    threads = torch.get_num_threads() if threads is None else threads
    return f"{name}, {threads} thread{'s' if threads != 1 else ''}"


def bench(args) -> List[Dict[str, Any]]:
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
    from .settings import describe

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
                speedup=s["throughput"] / base_speed, ideal_speedup=1.0 / row["speed_flops_ratio"])
    progress.close()
    return rows


def _speed_caption(rows: List[Dict[str, Any]]) -> str:
    r = rows[0]
    if "images_per_s" not in r:
        return "speed:    not measured (--speed-model none)"
    random = r["speed_weights"] == "random weights"
    return (f"speed:    {models.display_name(r['speed_model'])} {'architecture, ' if random else ''}{r['speed_weights']}"
            f"{' (its cost does not depend on them)' if random else ''}, batch {r['speed_batch_size']} on "
            f"{r['device']}; img/s: median [min-max] of {r['speed_runs']} interleaved runs")


def format_table(rows: List[Dict[str, Any]], model: str = models.REFERENCE) -> str:
    """The bench table: accuracy columns (evaluated model) | speed columns (timed model)."""
    has_speed = "images_per_s" in rows[0]
    left = f"{'method':<12}{'setting':<14}{'FLOPs':>7}{'top-1':>8}{'agree':>8}"
    right = f"{'GFLOPs':>8}{'FLOPs':>8}{'img/s':>8}{'[min-max]':>13}{'speedup':>9}{'ideal':>7}"
    group = " " * 26 + " accuracy ".center(len(left) - 26, "-")
    head = left
    if has_speed:
        name = models.display_name(rows[0]["speed_model"])
        if rows[0]["speed_weights"] == "random weights":
            name += " architecture, random weights"
        label = f" speed: {name} "
        group += "  | " + (label if len(label) <= len(right) else " speed ").center(len(right), "-")
        head += "  | " + right
    lines = [f"accuracy: {models.display_name(model)}, {rows[0].get('images', '?')} images; top-1 and agreement "
             "with the uncompressed model's top-1", _speed_caption(rows), "", group, head, "-" * len(head)]
    for r in rows:
        line = (f"{r['method']:<12}{r['setting']:<14}{100 * r['flops_ratio']:>6.1f}%{100 * r['top1']:>7.2f}%"
                f"{100 * r['agreement']:>7.1f}%")
        if has_speed:
            spread = f"[{r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f}]"
            line += (f"  | {r['speed_gflops']:>8.3f}{100 * r['speed_flops_ratio']:>7.1f}%{r['images_per_s']:>8.1f}"
                     f"{spread:>13}{r['speedup']:>8.2f}x{r['ideal_speedup']:>6.2f}x")
        lines.append(line)
    return "\n".join(lines)


_LABEL_OFFSETS = ((5, 5), (5, -11), (-5, 5), (-5, -11))  # budget labels of the methods, apart where points meet


def plot(rows: List[Dict[str, Any]], path: str, model: str = models.REFERENCE, title: Optional[str] = None) -> None:
    """Top-1 vs FLOPs (evaluated model), top-1 vs images/s and images/s vs FLOPs (timed model, medians
    with min-max error bars); budget labels on the points, one legend, model / hardware / date in the
    title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]
    has_speed = "images_per_s" in base
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 3 if has_speed else 1, figsize=(16, 5.2) if has_speed else (7, 5.2), squeeze=False)
    axes = axes[0]

    def curve(ax, x_of, y_of, xerr_of=None, yerr_of=None, label_points=True):
        for method in methods:
            runs = sorted((r for r in rows if r["method"] == method), key=lambda r: -r["flops_ratio"])
            pts = [base] + runs
            xs, ys = [x_of(r) for r in pts], [y_of(r) for r in pts]
            xerr = None if xerr_of is None else [[a for a, _ in map(xerr_of, pts)], [b for _, b in map(xerr_of, pts)]]
            yerr = None if yerr_of is None else [[a for a, _ in map(yerr_of, pts)], [b for _, b in map(yerr_of, pts)]]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", ms=5, capsize=3, color=colors[method], label=method)
            if label_points:
                offset = _LABEL_OFFSETS[methods.index(method) % len(_LABEL_OFFSETS)]
                for r, x, y in zip(runs, xs[1:], ys[1:]):
                    ax.annotate(r["setting"], (x, y), textcoords="offset points", xytext=offset, fontsize=7,
                                color=colors[method], ha="left" if offset[0] >= 0 else "right")
        ax.errorbar([x_of(base)], [y_of(base)], marker="*", ms=14, color="black", ls="none", zorder=3,
                    label="uncompressed")
        ax.grid(alpha=0.3)

    acc_name = models.display_name(model)
    ax = axes[0]
    curve(ax, lambda r: 100 * r["flops_ratio"], lambda r: 100 * r["top1"])
    ax.set_xlabel(f"FLOPs, % of uncompressed ({acc_name})")
    ax.set_ylabel(f"top-1 accuracy, % ({acc_name})")
    ax.set_title("accuracy vs FLOPs", fontsize=10)
    if has_speed:
        speed_name = models.display_name(base["speed_model"])

        def spread(r):
            return (r["images_per_s"] - r.get("images_per_s_min", r["images_per_s"]),
                    r.get("images_per_s_max", r["images_per_s"]) - r["images_per_s"])

        ax = axes[1]
        curve(ax, lambda r: r["images_per_s"], lambda r: 100 * r["top1"], xerr_of=spread)
        ax.set_xlabel(f"images / s, {speed_name} (median, bars: min-max of runs)")
        ax.set_ylabel(f"top-1 accuracy, % ({acc_name})")
        ax.set_title("accuracy vs throughput", fontsize=10)
        ax = axes[2]
        curve(ax, lambda r: 100 * r["speed_flops_ratio"], lambda r: r["images_per_s"], yerr_of=spread)
        ratios = sorted({r["speed_flops_ratio"] for r in rows})
        ax.plot([100 * q for q in ratios], [base["images_per_s"] / q for q in ratios], ls="--", color="grey", lw=1,
                label="ideal (uncompressed img/s / FLOPs ratio)")
        ax.set_xlabel(f"FLOPs, % of uncompressed ({speed_name})")
        ax.set_ylabel(f"images / s, {speed_name}, batch {base['speed_batch_size']}")
        ax.set_title("throughput vs FLOPs", fontsize=10)
    if title is None:
        where = hardware(base["device"], base.get("threads")) if has_speed else hardware("cpu")
        what = f"accuracy: {acc_name}"
        if has_speed:
            weights = base["speed_weights"]
            what += f"  |  speed: {speed_name} ({'architecture, ' if weights == 'random weights' else ''}{weights})"
        title = f"vitcompress bench -- {what}\n{where}  |  {datetime.date.today().isoformat()}"
    fig.suptitle(title, fontsize=10)
    handles, labels = axes[-1].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for h, lab in zip(*axes[0].get_legend_handles_labels()):
        seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=len(seen), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(args) -> int:
    import torch

    start = time.perf_counter()
    rows = bench(args)
    print(format_table(rows, args.model))
    print(f"({time.perf_counter() - start:.0f} s; {hardware(args.device)}, torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.plot:
        plot(rows, args.plot, args.model)
    return 0


def _add_bench_arguments(b) -> None:
    b.add_argument("--model", default=models.REFERENCE, metavar="NAME",
                   help="'reference' (embedded, offline; default) or a timm model name (needs --data)")
    b.add_argument("--pretrained", action="store_true", help="load the timm model's pretrained weights (needs a network)")
    b.add_argument("--data", metavar="FOLDER", help="ImageFolder of labelled validation images (with --model NAME)")
    b.add_argument("--num-images", type=_int_at_least(1, "--num-images 512"), default=None, metavar="N",
                   help="evaluate on at most this many images (default: all)")
    b.add_argument("--methods", nargs="+", metavar="METHOD", help="methods to compare (default: every method for ViT-like encoders)")
    b.add_argument("--flops", nargs="+", type=_fraction, default=list(DEFAULT_FLOPS), metavar="FRACTION",
                   help="FLOPs targets, fractions of the uncompressed model in (0, 1] (default: %(default)s)")
    b.add_argument("--settings", nargs="+", metavar="SETTING",
                   help="explicit method:budget settings instead, e.g. tome:r=8 pitome:keep=0.9")
    b.add_argument("--batch-size", type=_int_at_least(1, "--batch-size 256"), default=256, metavar="N",
                   help="batch size of the accuracy evaluation (default: %(default)s)")
    b.add_argument("--speed-model", default=None, metavar="NAME",
                   help="model timed for speed: a timm name (random weights), 'reference', or 'none' to skip "
                        "timing (default: deit_small_patch16_224 with the reference model, else --model itself)")
    b.add_argument("--speed-batch-size", type=_int_at_least(1, "--speed-batch-size 16"), default=16, metavar="N",
                   help="batch size of the timed runs (default: %(default)s)")
    b.add_argument("--runs", type=_int_at_least(1, "--runs 5"), default=5, metavar="N",
                   help="interleaved timed runs per model; throughput is their median (default: %(default)s)")
    b.add_argument("--workers", type=_int_at_least(0, "--workers 2"), default=2, metavar="N",
                   help="data-loading processes with --data (0: load in the main process; default: %(default)s)")
    b.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    b.add_argument("--device", default=None, metavar="DEVICE", help="cpu or cuda (default: cuda when available, else cpu)")
    b.add_argument("--json", type=_output_file(".json"), metavar="FILE", help="write the rows to this .json file")
    b.add_argument("--plot", type=_output_file(*PLOT_EXTENSIONS), metavar="FILE",
                   help="draw the plots into this image file (.png, .pdf, .svg or .jpg)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------- export


def _add_export_arguments(parser) -> None:
    parser.add_argument("--model", default=models.REFERENCE, metavar="NAME",
                        help="'reference' (the embedded Fashion-MNIST ViT, checked on its real images; default) "
                             "or a timm model name (checked on random inputs)")
    parser.add_argument("--pretrained", action="store_true", help="load the timm model's pretrained weights (needs a network)")
    parser.add_argument("--method", default="tome", metavar="METHOD",
                        help="token-reduction method, or 'none' to export uncompressed (default: %(default)s)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=_fraction, metavar="FRACTION", help="fraction of tokens kept per reducing block, in (0, 1]")
    budget.add_argument("--r", metavar="R", help="tokens removed per block: an int, a list '[8,8,4]' or '(r, inflection)'")
    budget.add_argument("--flops", type=_fraction, metavar="FRACTION", help="target fraction of the uncompressed FLOPs, in (0, 1]")
    parser.add_argument("--out", type=_output_file(".onnx"), metavar="FILE", help="output .onnx file (default: <model>-<method>.onnx)")
    parser.add_argument("--batch-size", type=_int_at_least(1, "--batch-size 8"), default=8, metavar="N",
                        help="batch of the example input and of the real-image check (default: %(default)s)")
    parser.add_argument("--img-size", type=_int_at_least(1, "--img-size 224"), metavar="PIXELS", help="input height and width (default: the model's)")
    parser.add_argument("--opset", type=_int_at_least(1, "--opset 18"), default=None, metavar="N",
                        help="ONNX opset, >= 17 (default: 18, the native opset of torch's ONNX exporter)")
    parser.add_argument("--num-images", type=_int_at_least(1, "--num-images 512"), default=512, metavar="N",
                        help="real images checked with the reference model (default: %(default)s)")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a dynamic batch dimension")
    parser.add_argument("--no-optimize", action="store_true", help="skip onnxscript's graph optimiser")
    parser.add_argument("--atol", type=_non_negative_float, default=1e-4, metavar="TOL",
                        help="largest accepted max abs difference (default: %(default)s)")
    parser.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                        help="runtime the file is checked in (default: %(default)s; openvino needs "
                             "pip install 'vitcompress[edge]')")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="write an int8 file (onnxruntime static quantization of the linear layers, QDQ) "
                             "judged by top-1 agreement with the fp32 model instead of --atol")
    parser.add_argument("--calibration-images", type=_int_at_least(1, "--calibration-images 64"), default=None,
                        metavar="N", help="int8 calibration images: reference images for the reference model, "
                                          "random-normal inputs otherwise (default: 64)")
    parser.add_argument("--float-reductions", type=_int_at_least(0, "--float-reductions 2"), default=None,
                        metavar="N", help="int8: the linear layers feeding the first N token reductions stay in "
                                          "float, where a choice flipped by int8 noise changes the most (default: 2)")
    parser.add_argument("--min-agreement", type=_fraction, default=0.99, metavar="FRACTION",
                        help="least top-1 agreement accepted for --quantize int8 (default: %(default)s)")


def export_budget(args) -> Dict[str, Any]:
    """The ``keep`` / ``r`` / ``flops`` budget of ``vitcompress export``, or ``{}`` for the default."""
    if args.keep is not None:
        return {"keep": args.keep}
    if args.flops is not None:
        return {"flops": args.flops}
    if args.r is not None:
        return {"r": parse_budget_text(args.r)}
    return {}


def _check_export(args, parser) -> None:
    try:
        models.check_model_name(args.model, args.pretrained)
        if args.model == models.REFERENCE:
            side = models.reference_input_size()[-1]
            if args.img_size is not None and args.img_size != side:
                raise ValueError(f"--img-size {args.img_size}: the reference model takes {side}x{side} images "
                                 "(drop --img-size)")
            if args.static_batch and args.num_images % args.batch_size:
                raise ValueError(f"--num-images {args.num_images} does not fill whole batches of {args.batch_size} "
                                 "(--static-batch): give a multiple of --batch-size")
        from ..export import DEFAULT_OPSET, MIN_OPSET

        args.opset = DEFAULT_OPSET if args.opset is None else args.opset
        if args.opset < MIN_OPSET:
            raise ValueError(f"--opset {args.opset}: vitcompress exports ONNX opset {MIN_OPSET} or newer; "
                             f"give e.g. --opset {DEFAULT_OPSET}")
        if args.quantize and args.runtime != "onnxruntime":
            raise ValueError(f"--quantize int8 writes onnxruntime's QDQ format and is checked in onnxruntime: "
                             f"drop --runtime {args.runtime}")
        if not args.quantize and args.calibration_images is not None:
            raise ValueError("--calibration-images applies to --quantize int8")
        if not args.quantize and args.float_reductions is not None:
            raise ValueError("--float-reductions applies to --quantize int8")
        if args.quantize and args.static_batch and (args.calibration_images or 64) % args.batch_size:
            raise ValueError(f"--calibration-images {args.calibration_images or 64} does not fill whole batches of "
                             f"{args.batch_size} (--static-batch): give a multiple of --batch-size")
        if args.runtime == "openvino":
            import importlib.util

            if importlib.util.find_spec("openvino") is None:
                raise ValueError("--runtime openvino needs the openvino package: pip install 'vitcompress[edge]'")
        budget = export_budget(args)
        if args.method == "none":
            if budget:
                raise ValueError("--keep / --r / --flops need a compression --method (not none)")
        else:
            check_setting(args.method, budget, exportable=True)
        if args.out is None:
            args.out = check_output_file(f"{args.model.replace('/', '_')}-{args.method}.onnx", (".onnx",))
    except (ValueError, TypeError) as err:
        parser.error(str(err))


def run_export(args) -> int:
    """``vitcompress export`` (arguments already checked): build, compress, export, check; 0 when
    the runtime matches PyTorch (int8: top-1 agreement of at least --min-agreement)."""
    import torch

    from .. import api
    from ..export import CALIBRATION_IMAGES, FLOAT_REDUCTIONS, export_onnx

    calibrate = args.calibration_images or CALIBRATION_IMAGES
    reference = args.model == models.REFERENCE
    wanted = max(args.num_images, calibrate) if reference and args.quantize else args.num_images
    loaded = models.load_model(args.model, pretrained=args.pretrained, img_size=args.img_size, num_images=wanted)
    model, inputs = loaded.model, loaded.images
    channels, size, _ = loaded.input_size
    calibration = None
    if args.quantize:
        if reference:
            calibration, inputs = inputs[:calibrate], inputs[:args.num_images]
            print(f"int8 calibration: the first {calibrate} reference images")
        else:
            calibration = torch.randn((calibrate, channels, size, size), generator=torch.Generator().manual_seed(0))
            print(f"int8 calibration: {calibrate} random-normal inputs (no images ship with {args.model}; the "
                  "activation ranges of real images may differ)")
    if args.method != "none":
        api.compress(model, args.method, **export_budget(args))
        stats = api.stats(model)
        print(f"{args.model}: {args.method} {stats['budget']}, tokens per block {stats['planned_tokens_per_layer']}")
    report = export_onnx(model, args.out, (args.batch_size, channels, size, size), opset=args.opset,
                         dynamic_batch=not args.static_batch, inputs=inputs, atol=args.atol,
                         optimize=not args.no_optimize, runtime=args.runtime, quantize=args.quantize,
                         calibration=calibration, min_match=args.min_agreement if args.quantize else 0.99,
                         float_reductions=FLOAT_REDUCTIONS if args.float_reductions is None else args.float_reductions,
                         verbose=True)
    return 0 if report.ok else 1


# --------------------------------------------------------------------------- main


def _version() -> str:
    from importlib import metadata

    from .. import __version__

    parts = []
    for dist in ("torch", "timm"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return f"vitcompress {__version__}" + (f" ({', '.join(parts)})" if parts else "")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="vitcompress", description="Training-free token reduction for transformers (timm, open_clip, "
                                                 "DETR, LLaVA). Run 'vitcompress bench' to see what it does.")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", required=True, metavar="{bench,export}")
    ap.commands = {
        "bench": sub.add_parser("bench", help="accuracy, FLOPs and speed of every method at several budgets (offline)",
                                description=BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter),
        "export": sub.add_parser("export", help="export a compressed model to ONNX and check it in onnxruntime "
                                                "against PyTorch",
                                 description=EXPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter),
    }
    _add_bench_arguments(ap.commands["bench"])
    _add_export_arguments(ap.commands["export"])
    return ap


COMMANDS = {"bench": (_check_bench, run_bench), "export": (_check_export, run_export)}


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check every argument (no model is built); a bad one exits with code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check, _ = COMMANDS[args.command]
    check(args, parser.commands[args.command])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    _, run = COMMANDS[args.command]
    try:
        return run(args)
    except (ValueError, TypeError, ImportError, OSError) as err:  # a model's own refusal, a missing extra, ...
        message = " ".join(str(err).split())
        print(f"vitcompress {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
