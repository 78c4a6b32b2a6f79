"""The arguments the evaluation, training and benchmark scripts share, and their checks.

An evaluation script checks every argument as ``vitcompress bench`` does, before any model is
built: a bad one ends it with one line naming the fix (``eval_imagenet.py: error: ...``) and exit
status 2. The checks read nothing but the arguments (and the devices), so under torchrun every
rank reaches the same verdict before the process group starts: each prints the same line and
exits 2, and no rank is left waiting for another.
"""
import argparse
import os
from typing import Any, Dict, Optional

from .arguments import OneLineErrorParser, budget_arguments, check_setting


def parser(script: str, description: str) -> argparse.ArgumentParser:
    """The parser of the script file ``script``: its ``description`` as written, errors on one line
    (``<script name>: error: ...``) with exit status 2."""
    return OneLineErrorParser(prog=os.path.basename(script), description=description,
                   formatter_class=argparse.RawDescriptionHelpFormatter)


# --------------------------------------------------------------------------- ViT methods and budgets


def add_budget_arguments(parser: argparse.ArgumentParser, what: str = "model") -> None:
    """``--keep`` / ``--r`` / ``--flops``, at most one, as ``vitcompress export`` takes them."""
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=float, metavar="FRACTION",
                        help="fraction of tokens kept per reducing block, in (0, 1]")
    budget.add_argument("--r", metavar="R", help="tokens removed per block: an int, a list '[8,8,4]' or "
                                                 "'(r, inflection)'")
    budget.add_argument("--flops", type=float, metavar="FRACTION",
                        help=f"target fraction of the {what}'s FLOPs, in (0, 1]")


def vit_budget(args: argparse.Namespace, options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The budget of ``args`` (``--keep`` / ``--r`` / ``--flops``) as ``compress`` takes it, checked
    with ``args.method`` and its ``options``; ``{}`` without a method. ``ValueError`` /
    ``TypeError`` name the fix."""
    budget = budget_arguments(args)
    if args.method is None:
        if budget or options:
            raise ValueError("--keep / --r / --flops and method options need a compression --method")
        return {}
    check_setting(args.method, dict(budget, **(options or {})))
    return budget


# --------------------------------------------------------------------------- DETR and COCO


def add_detr_arguments(parser: argparse.ArgumentParser,
                       model_help: str = "transformers model name, e.g. facebook/detr-resnet-50") -> None:
    """The DETR that :func:`vitcompress.evaluation.coco.load_detr` builds: ``--model``,
    ``--pretrained``, ``--config``, ``--checkpoint``."""
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--pretrained", action="store_true", help="load the model's pretrained weights (needs a network)")
    parser.add_argument("--config", help="a DetrConfig (JSON file or directory) for a local model")
    parser.add_argument("--checkpoint", help="local weights: a state_dict file, or a save_pretrained directory")


def add_coco_arguments(parser: argparse.ArgumentParser) -> None:
    """The images and annotations of a :class:`vitcompress.evaluation.coco.CocoDetection`."""
    parser.add_argument("--data-dir", required=True, help="folder of the images named in the annotations")
    parser.add_argument("--annotations", required=True, help="COCO-format annotation JSON")
    parser.add_argument("--size", type=int, default=800, help="shortest image side after resizing (DETR: 800)")
    parser.add_argument("--max-size", type=int, default=1333, help="longest image side after resizing (DETR: 1333)")
    parser.add_argument("--max-images", type=int, default=None)
