"""Encoder GFLOPs and time of a DETR with Focus-DETR token reduction, per scorer.

    python experiments/benchmarks/bench_detr_encoder.py                      # DETR-R50 architecture, random weights
    python experiments/benchmarks/bench_detr_encoder.py --model facebook/detr-resnet-50 --pretrained --device cuda

GFLOPs: fvcore's count of the encoder alone (token scoring and dual attention included). Time: the
encoder alone on one image (its inputs computed once), all settings timed interleaved
(``vitcompress.compare_speed``, median of ``--runs``); ``ideal`` is the speedup the FLOPs ratio implies.
"""
import argparse
import copy

import torch

import vitcompress
from vitcompress.adapters.detr import encoder_inputs
from vitcompress.cli.script_arguments import add_detr_arguments
from vitcompress.evaluation.coco import load_detr
from vitcompress.methods.focus_detr import FocusScorer, load_scorer
from vitcompress.profile.detr import EncoderCall, count_encoder_flops

SETTINGS = {
    "uncompressed": None,
    "norm, dual_k=0": {"scorer": "norm", "dual_k": 0},
    "norm": {"scorer": "norm"},
    "attention": {"scorer": "attention"},
    "learned": {"scorer": "learned"},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_detr_arguments(ap, model_help="transformers model name (default: DetrConfig(), the DETR-R50 architecture)")
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--width", type=int, default=1088)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--scorer-path", default=None, help="a trained head for the learned row (default: a random one)")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.model or args.config or args.checkpoint:
        model = load_detr(args.model, args.pretrained, args.config, args.checkpoint)
    else:
        from transformers import DetrConfig, DetrForObjectDetection
        model = DetrForObjectDetection(DetrConfig(use_pretrained_backbone=False)).eval()  # no weight download
    model = model.to(device)
    x = torch.randn(1, 3, args.height, args.width, device=device)
    head = load_scorer(args.scorer_path) if args.scorer_path else FocusScorer(model.config.d_model)

    calls, gflops, tokens = {}, {}, {}
    for name, options in SETTINGS.items():
        m = model
        if options is not None:
            extra = {"scorer_module": head} if options["scorer"] == "learned" else {}
            m = vitcompress.compress(copy.deepcopy(model), "focus_detr", keep=args.keep, **options, **extra)
        gflops[name] = count_encoder_flops(m, x) / 1e9
        if options is not None:
            st = vitcompress.stats(m)
            tokens[name] = (st["tokens_per_layer"], st["dual_tokens_per_layer"])
        with torch.no_grad():
            calls[name] = EncoderCall(m, encoder_inputs(m, x))
    with torch.no_grad():
        embeds = encoder_inputs(model, x)["inputs_embeds"]  # the same for every setting: the backbone is untouched
    speed = vitcompress.compare_speed(calls, embeds, runs=args.runs, latency=False, memory=False)

    base_flops, base_speed = gflops["uncompressed"], speed["uncompressed"]["throughput"]
    print(f"{args.height}x{args.width}, keep={args.keep}, {args.device}, {torch.get_num_threads()} threads, "
          f"{args.runs} interleaved runs (median)")
    print(f"{'setting':<18}{'GFLOPs':>8}{'% base':>8}{'ms':>8}{'speedup':>9}{'ideal':>7}")
    for name in SETTINGS:
        ms = 1000 / speed[name]["throughput"]
        print(f"{name:<18}{gflops[name]:>8.2f}{100 * gflops[name] / base_flops:>7.1f}%{ms:>8.1f}"
              f"{speed[name]['throughput'] / base_speed:>8.2f}x{base_flops / gflops[name]:>6.2f}x")
    for name, (kept, dual) in tokens.items():
        print(f"  {name}: tokens per layer {kept}, dual attention {dual}")
    return {"gflops": gflops, "speed": speed, "tokens": tokens}


if __name__ == "__main__":
    main()
