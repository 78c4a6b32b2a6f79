"""Why training-free EViT is no better than random pruning on the reference model (issue 26): its fused
token or its class-attention ranking?

On the embedded reference model (3,000 Fashion-MNIST test images), at each FLOPs budget: ``evit`` as
the official code runs it, the same ranking without the fused token (the ``T - remove`` most attended
tokens kept, the rest dropped: the same tokens removed per block), and random pruning at that
schedule over several seeds (mean, min-max). If the ranking without fusion beats random and EViT
does not, the fused token -- an unnormalised sum of the inattentive tokens, which the network never
saw in training -- costs what the ranking gains.

    python experiments/studies/evit_fusion.py                    # flops 0.85 0.7 0.55, 5 seeds (~3 min idle)
"""
import argparse
from unittest import mock

import torch

import vitcompress
from vitcompress.evaluation import reference_model
from vitcompress.interfaces import Plan
from vitcompress.kernels import dispatch
from vitcompress.methods import evit


def top_k_without_fusion(cls_attn: torch.Tensor, remove: int) -> Plan:
    """EViT's ranking alone: keep the ``T - remove`` most attended tokens (most attended first)."""
    T = cls_attn.shape[1]
    return Plan(keep=dispatch.topk_indices(cls_attn, T)[:, : T - remove])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flops", type=float, nargs="+", default=[0.85, 0.7, 0.55])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--images", type=int, default=None, help="reference test images (default: all 3,000)")
    args = p.parse_args(argv)
    model, images, labels = reference_model.load(args.images)

    def top1() -> float:
        with torch.inference_mode():
            pred = torch.cat([model(images[i:i + 500]).argmax(-1) for i in range(0, len(images), 500)])
        return 100 * float((pred == labels).double().mean())

    print(f"reference model, {len(images)} images: uncompressed top-1 {top1():.2f}")
    print("| flops= | tokens removed per block | evit | evit ranking, no fused token | "
          f"random at that schedule ({args.seeds} seeds: mean, min-max) |")
    print("|---|---|---|---|---|")
    for flops in args.flops:
        vitcompress.compress(model, "evit", flops=flops)
        schedule = list(vitcompress.stats(model)["schedule"])
        with_fusion = top1()
        with mock.patch.object(evit, "evit_plan", top_k_without_fusion):
            without_fusion = top1()
        runs = []
        for seed in range(args.seeds):
            vitcompress.compress(model, "random", r=schedule, seed=seed)
            runs.append(top1())
        vitcompress.restore(model)
        print(f"| {flops} | {' '.join(map(str, schedule))} | {with_fusion:.2f} | {without_fusion:.2f} | "
              f"{sum(runs) / len(runs):.2f} ({min(runs):.2f}-{max(runs):.2f}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
