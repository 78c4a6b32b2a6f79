"""``vitcompress tune``: the fastest setting within an accuracy budget, on your model, data and device."""
import json
import os
import sys

from ..evaluation import models
from .arguments import check_device, fraction, int_at_least, non_negative_float, output_file
from .report import PLOT_EXTENSIONS

HELP = "find the fastest method and budget that loses at most --max-drop on your data, measured on your device"

DESCRIPTION = """\
Evaluate every ViT method (and random pruning, the baseline) at several FLOPs budgets on your
images, time them all in one interleaved run on your device, refine the budget of the fastest
within --max-drop, and print the table, the Pareto front and the one-line compress call.

  vitcompress tune --model reference --max-drop 1.0                # offline: the embedded model and images
  vitcompress tune --model deit_small_patch16_224 --pretrained --data-dir val/ --max-drop 0.5 \\
      --batch-size 64 --device cuda --amp --json tune.json --plot tune.png

--data-dir: an ImageFolder (one sub-folder per class, named by class: synset ids or names for
ImageNet models) for top-1, or a folder of unlabelled images (top-1 agreement with the
uncompressed model). Speed figures come with the device, dtype, batch, threads, attention backend
and load; a machine too busy to time is named in a warning.
"""


def add_arguments(p) -> None:
    """The arguments of ``vitcompress tune`` (timm's names where timm has one)."""
    p.add_argument("--model", default=models.REFERENCE, metavar="NAME",
                   help="'reference' (embedded, offline; default) or a timm model name (needs --data-dir)")
    p.add_argument("--pretrained", action="store_true",
                   help="load the timm model's pretrained weights (needs a network)")
    p.add_argument("--checkpoint", metavar="FILE", help="a local state_dict to load into the timm model")
    p.add_argument("--data-dir", metavar="DIR", help="ImageFolder (labelled) or a folder of images (unlabelled); "
                                                     "default with --model reference: its shipped test images")
    p.add_argument("--num-images", type=int_at_least(1, "--num-images 512"), default=None, metavar="N",
                   help="use at most this many images (spread over the classes; default: all)")
    p.add_argument("--max-drop", type=non_negative_float, default=0.5, metavar="POINTS",
                   help="points of the metric the chosen setting may lose (default: %(default)s)")
    p.add_argument("--metric", choices=("top1", "agreement", "cosine"), default=None,
                   help="top1 (labels), agreement (top-1 agreement with the uncompressed model) or cosine "
                        "(embeddings); default: top1 with labels, else agreement")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="methods to try (default: every static ViT method)")
    p.add_argument("--budgets", nargs="+", type=fraction, metavar="FRACTION",
                   help="FLOPs fractions to try for every method (default: 0.9 0.8 0.7 0.6 0.5)")
    p.add_argument("--no-random", action="store_true", help="leave out the random-pruning baseline")
    p.add_argument("--batch-size", type=int_at_least(1, "--batch-size 64"), default=64, metavar="N",
                   help="batch size of the evaluation and of the timed runs (default: %(default)s)")
    p.add_argument("--runs", type=int_at_least(1, "--runs 5"), default=5, metavar="N",
                   help="interleaved timed rounds; images/s is their median (default: %(default)s)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop adding settings when the search would take longer than this")
    p.add_argument("--workers", type=int_at_least(0, "--workers 2"), default=2, metavar="N",
                   help="image-loading processes for --data-dir (default: %(default)s)")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    p.add_argument("--device", default=None, metavar="DEVICE", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", type=output_file(".json"), metavar="FILE", help="write the result to this .json file")
    p.add_argument("--print-json", action="store_true", help="print the result as JSON instead of the table (scripts)")
    p.add_argument("--plot", type=output_file(*PLOT_EXTENSIONS), metavar="FILE",
                   help="draw quality vs measured speedup into this image file (.png, .pdf, .svg or .jpg)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_arguments(args, parser) -> None:
    """Check every argument of ``vitcompress tune`` before any model is built (``parser.error``: exit 2)."""
    from .. import api
    from ..methods import get

    try:
        models.check_model_name(args.model, args.pretrained)
        if args.model != models.REFERENCE and not args.data_dir:
            raise ValueError(f"--model {args.model} needs --data-dir DIR (an ImageFolder, or a folder of images)")
        if args.data_dir and not os.path.isdir(args.data_dir):
            raise ValueError(f"--data-dir {args.data_dir}: no such folder; give an ImageFolder (one sub-folder of "
                             "images per class) or a folder of images")
        static = [m for m in api.list_methods("vit") if not get(m).dynamic]
        for method in args.methods or []:
            if method not in static:
                raise ValueError(f"--methods {method}: unknown; choose from {', '.join(static)}")
        if args.budgets and any(b >= 1.0 for b in args.budgets):
            raise ValueError("--budgets: 1.0 is the uncompressed model; give fractions below 1, e.g. 0.8 0.6")
        if args.time_budget is not None and not args.time_budget > 0:
            raise ValueError(f"--time-budget {args.time_budget:g}: give a number of seconds > 0, e.g. 600")
        args.device = check_device(args.device)
    except (ValueError, TypeError) as err:
        parser.error(str(err))


def run(args) -> int:
    """``vitcompress tune`` (arguments already checked): tune, print, write the JSON and the plot."""
    import torch

    from ..evaluation.classification import ReferenceTransform
    from ..tuning import tune

    reference = args.model == models.REFERENCE
    loaded = models.load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                               num_images=None if reference and not args.data_dir else 0)
    if args.data_dir:
        from ..evaluation.classification import imagefolder_loader

        loader = imagefolder_loader(args.data_dir, loaded.model, args.batch_size, args.workers, args.num_images,
                                    reference_model=reference, labelled=None)
        data = loader
    else:  # the reference model's shipped test images
        count = args.num_images or len(loaded.images)
        data = (loaded.images[:count], loaded.labels[:count])
    result = tune(loaded.model, data, max_drop=args.max_drop, metric=args.metric, methods=args.methods,
                  budgets=args.budgets, batch_size=args.batch_size, device=args.device, amp=args.amp,
                  time_budget=args.time_budget, runs=args.runs, random_baseline=not args.no_random,
                  transform=ReferenceTransform() if reference else None, progress=not args.quiet)
    if args.print_json:
        print(result.to_json())
    else:
        print(f"model: {models.display_name(args.model)} ({loaded.weights}); torch {torch.__version__}")
        print(result.table())
    if result.skipped and not args.print_json:
        print("skipped: " + "; ".join(result.skipped), file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(result.to_dict(), model=args.model, weights=loaded.weights), f, indent=2)
    if args.plot:
        result.plot(args.plot, title=f"vitcompress tune: {models.display_name(args.model)}")
    return 0
