"""ImageNet-style evaluation of a (compressed) timm model: top-1, top-5, GFLOPs, images/s.

    python experiments/evaluation/eval_imagenet.py --model deit_small_patch16_224 --pretrained \
        --data-dir /data/imagenet/val --method zero_tprune --flops 0.653 --amp

``--data-dir`` is an ImageFolder (one sub-folder per class): folders named by class (synset ids or
names) are matched to the model's classes by name, others taken in sorted order only when their count
is the number of classes (:mod:`vitcompress.evaluation.folders`).
Without ``--method`` the uncompressed model is evaluated; with it, both are, side by side.

On several devices (or nodes) launch it with torchrun; each rank evaluates its own shard of the
images, rank 0 prints the totals (and images/s summed over the ranks, and per rank):

    torchrun --nproc_per_node 8 experiments/evaluation/eval_imagenet.py --model deit_small_patch16_224 ...
"""
import copy
import sys

import torch

import vitcompress
from vitcompress.cli import script_arguments
from vitcompress.cli.arguments import check_device
from vitcompress.evaluation import distributed, models
from vitcompress.evaluation.classification import (autocast, hit_counts, imagefolder_loader, predict, rates,
                                                   throughput_over_ranks)


def parse_args(argv=None):
    """The arguments, every one checked before a model is built (one line and exit 2 if bad)."""
    ap = script_arguments.parser(__file__, __doc__)
    ap.add_argument("--model", required=True, help="timm model name, or 'reference' for the embedded Fashion-MNIST ViT")
    ap.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs a network)")
    ap.add_argument("--checkpoint", help="a local state_dict (or {'state_dict': ...}) to load instead")
    ap.add_argument("--num-classes", type=int, default=None, help="override the classifier size")
    ap.add_argument("--data-dir", required=True, help="ImageFolder of validation images")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    ap.add_argument("--max-images", type=int, default=None)
    ap.add_argument("--method", choices=vitcompress.list_methods("vit"), help="token-reduction method")
    script_arguments.add_budget_arguments(ap)
    ap.add_argument("--runs", type=int, default=5, help="timed runs for images/s")
    ap.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="evaluate and time torch.compile'd models (backend: inductor)")
    ap.add_argument("--json", help="write the result rows (a JSON list) to this file")
    args = ap.parse_args(argv)
    try:
        models.check_model_name(args.model, args.pretrained)
        args.device = check_device(args.device)
        args.budget = script_arguments.vit_budget(args)
    except (ValueError, TypeError) as err:
        ap.error(str(err))
    return args


def evaluate(args, ctx: distributed.Context):
    """One row per model on rank 0 (None on the others): accuracy over every rank's shard, GFLOPs,
    images/s summed over the ranks (timed together) and per rank."""
    device = ctx.device
    with ctx.step("loading the model"):
        try:
            model = models.load_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint,
                                      num_classes=args.num_classes, num_images=0).model.to(device)
        except (ValueError, OSError) as err:  # unknown name, hub unreachable, bad checkpoint: the message says the fix
            sys.exit(f"eval_imagenet: {err}")
        compared = {"uncompressed": model}
        if args.method:
            compared[args.method] = vitcompress.compress(copy.deepcopy(model), args.method, **args.budget)
    with ctx.step("reading the images"):
        try:  # every rank its own shard, the same for every model
            loader = imagefolder_loader(args.data_dir, model, args.batch_size, args.workers, args.max_images,
                                        reference_model=args.model == "reference", ctx=ctx)
            sample = next(iter(loader))[0].to(device)
        except (ValueError, OSError) as err:  # no such folder, no class folders, fewer images than ranks
            sys.exit(f"eval_imagenet: {err}")
    runnable = {name: torch.compile(m, backend=args.torchcompile) if args.torchcompile else m
                for name, m in compared.items()}
    ctx.barrier()  # the ranks time at the same moment, so their images/s add up
    with ctx.step("timing the models"), autocast(device, args.amp):
        speed = vitcompress.compare_speed(runnable, sample, runs=args.runs, latency=False, memory=False)
    rows = []
    for name, m in compared.items():
        with ctx.step(f"evaluating {name}"):
            counts = hit_counts(*predict(runnable[name], loader, device, amp=args.amp,
                                         progress=name if ctx.is_main else None))
            gflops = vitcompress.count_flops(m, sample[:1]) / 1e9
        total, per_rank = distributed.sum_counts(counts, ctx), ctx.gather(counts["images"])
        throughput = throughput_over_ranks(speed[name]["throughput"], ctx)
        if ctx.is_main:
            row = dict(model=name, **rates(total), images=total["images"], images_per_rank=per_rank,
                       gflops=gflops, **throughput)
            if name != "uncompressed":
                row["tokens_per_layer"] = vitcompress.stats(m)["tokens_per_layer"]
            rows.append(row)
    return rows if ctx.is_main else None


def format_table(rows) -> str:
    lines = [f"{'model':<16}{'top-1':>8}{'top-5':>8}{'GFLOPs':>9}{'img/s':>9}"]
    for r in rows:
        lines.append(f"{r['model']:<16}{100 * r['top1']:>7.2f}%{100 * r['top5']:>7.2f}%{r['gflops']:>9.3f}"
                     f"{r['images_per_s']:>9.1f}")
        if "tokens_per_layer" in r:
            lines.append(f"  tokens per layer: {r['tokens_per_layer']}")
    lines += distributed.rank_lines(rows)
    return "\n".join(lines)


def main(argv=None):
    distributed.run_script(evaluate, parse_args(argv), format_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
