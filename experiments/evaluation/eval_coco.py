"""COCO bbox AP of a DETR with and without token reduction in its encoder, with the encoder's
GFLOPs and images/s, in one table.

    python experiments/evaluation/eval_coco.py --model facebook/detr-resnet-50 --pretrained \
        --data-dir coco/val2017 --annotations coco/annotations/instances_val2017.json \
        --keep 0.5 --scorer learned --scorer-path focus_scorer_detr_r50.pt --amp

Local models: ``--config CONFIG.json --checkpoint STATE_DICT.pt`` or ``--checkpoint DIR``
(a ``save_pretrained`` directory). A model's class index is read as the COCO ``category_id``.

AP, AP50, AP75: pycocotools ``COCOeval`` (bbox) over all queries of every image. Encoder GFLOPs:
fvcore's count of the encoder alone (scoring and dual attention included), averaged over the
first ``--flops-images`` images, each at its own size (batch 1, no padding). images/s: the whole
detector on the first batch (padding included), the models timed interleaved
(``vitcompress.compare_speed``, median of ``--runs``).

On several devices (or nodes) launch it with torchrun: each rank detects on its own shard of the
images and rank 0 scores every detection (images/s: the sum over the ranks, and per rank):

    torchrun --nproc_per_node 8 experiments/evaluation/eval_coco.py --model facebook/detr-resnet-50 --pretrained ...
"""
import copy
import functools
import statistics
from typing import Optional

import torch
from tqdm.auto import tqdm

import vitcompress
from vitcompress.cli import script_arguments
from vitcompress.cli.arguments import check_device, check_setting
from vitcompress.evaluation import distributed
from vitcompress.evaluation.classification import autocast, gather_detections, throughput_over_ranks
from vitcompress.evaluation.coco import CocoDetection, bbox_ap, check_labels, detections, load_detr, loader
from vitcompress.profile.detr import count_encoder_flops


def parse_args(argv=None):
    """The arguments, every one checked before a model is built (one line and exit 2 if bad)."""
    ap = script_arguments.parser(__file__, __doc__)
    script_arguments.add_detr_arguments(ap)
    script_arguments.add_coco_arguments(ap)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on CUDA)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    ap.add_argument("--method", default="focus_detr", choices=vitcompress.list_methods("detr"))
    ap.add_argument("--keep", type=float, default=None, help="rho, the fraction of encoder tokens kept (default 0.5)")
    ap.add_argument("--scorer", choices=("norm", "attention", "learned"), default=None,
                    help="foreground scorer (default: norm, zero-shot)")
    ap.add_argument("--scorer-path", default=None, help="trained head for --scorer learned (train_focus_scorer.py)")
    ap.add_argument("--dual-k", type=int, default=None, help="tokens given dual attention per layer (default 300; 0: off)")
    ap.add_argument("--no-baseline", action="store_true", help="evaluate the compressed model only")
    ap.add_argument("--runs", type=int, default=5, help="timed runs for images/s")
    ap.add_argument("--flops-images", type=int, default=4, help="images the encoder GFLOPs are averaged over")
    ap.add_argument("--json", help="write the result rows (a JSON list) to this file")
    args = ap.parse_args(argv)
    args.options = {k: v for k, v in (("scorer", args.scorer), ("scorer_path", args.scorer_path),
                                      ("dual_k", args.dual_k)) if v is not None}
    try:
        args.device = check_device(args.device)
        check_setting(args.method, dict(args.options, keep=args.keep), target="detr")
    except (ValueError, TypeError) as err:
        ap.error(str(err))
    return args


def predict(model, batches, device, amp, progress: Optional[str]):
    """COCO result dicts for every image of ``batches`` (a progress bar unless ``progress`` is None)."""
    results = []
    with torch.inference_mode():
        for pixel_values, pixel_mask, targets in tqdm(batches, desc=progress, disable=progress is None, leave=False):
            with autocast(device, amp):
                out = model(pixel_values=pixel_values.to(device), pixel_mask=pixel_mask.to(device))
            results += detections(out.logits.cpu(), out.pred_boxes.cpu(), targets)
    return results


def evaluate(args, ctx: distributed.Context):
    """One row per model on rank 0 (None on the others): every rank detects on its shard of the
    images, rank 0 scores all detections (gathered in dataset order) against the annotations."""
    device = ctx.device
    with ctx.step("loading the model and the images"):
        model = load_detr(args.model, args.pretrained, args.config, args.checkpoint).to(device)
        dataset = CocoDetection(args.data_dir, args.annotations, args.size, args.max_size, args.max_images)
        check_labels(dataset.coco, model.config.num_labels)
        batches = loader(distributed.shard(dataset, ctx), args.batch_size, args.workers)  # the same for every model

        compressed = vitcompress.compress(copy.deepcopy(model), args.method, keep=args.keep, **args.options)
        label = f"{args.method} {vitcompress.stats(compressed)['budget']}"
        models = {label: compressed} if args.no_baseline else {"uncompressed": model, label: compressed}

        pixel_values, pixel_mask, _ = next(iter(batches))
        pixel_values, pixel_mask = pixel_values.to(device), pixel_mask.to(device)
        timed = {name: functools.partial(m, pixel_mask=pixel_mask) for name, m in models.items()}
    ctx.barrier()  # the ranks time at the same moment, so their images/s add up
    with ctx.step("timing the models"), autocast(device, args.amp):
        speed = vitcompress.compare_speed(timed, pixel_values, runs=args.runs, latency=False, memory=False)

    rows = []
    images_per_rank = ctx.gather(len(batches.dataset))
    for name, m in models.items():
        with ctx.step(f"detecting with {name}"):
            results = predict(m, batches, device, args.amp, name if ctx.is_main else None)
        results = gather_detections(results, dataset.ids, ctx)
        throughput = throughput_over_ranks(speed[name]["throughput"], ctx)
        with ctx.step(f"scoring {name}"):  # rank 0's work, but a failure there must stop the others too
            if ctx.is_main:
                row = dict(bbox_ap(dataset.coco, results, dataset.ids), model=name, images=len(dataset),
                           images_per_rank=images_per_rank)
                if m is compressed:
                    row["tokens_per_layer"] = vitcompress.stats(m)["tokens_per_layer"]
                flops_images = [dataset[i][0][None].to(device) for i in range(min(args.flops_images, len(dataset)))]
                row["encoder_gflops"] = statistics.mean(count_encoder_flops(m, x) for x in flops_images) / 1e9
                rows.append(dict(row, **throughput))
    return rows if ctx.is_main else None


def format_table(rows) -> str:
    base = rows[0]["encoder_gflops"] if rows[0]["model"] == "uncompressed" else None  # None: --no-baseline
    lines = [f"{'model':<24}{'AP':>7}{'AP50':>7}{'AP75':>7}{'enc GFLOPs':>12}{'% base':>8}{'img/s':>8}"]
    for row in rows:
        share = "-" if base is None else f"{100 * row['encoder_gflops'] / base:.1f}%"
        lines.append(f"{row['model']:<24}{100 * row['AP']:>7.1f}{100 * row['AP50']:>7.1f}{100 * row['AP75']:>7.1f}"
                     f"{row['encoder_gflops']:>12.3f}{share:>8}{row['images_per_s']:>8.1f}")
    lines.append(f"tokens per encoder layer (last batch, {rows[-1]['model']}): {rows[-1]['tokens_per_layer']}")
    lines += distributed.rank_lines(rows)
    return "\n".join(lines)


def main(argv=None):
    """The rows on rank 0 (printed, and written to ``--json``); None on the other ranks."""
    return distributed.run_script(evaluate, parse_args(argv), format_table)


if __name__ == "__main__":
    main()
