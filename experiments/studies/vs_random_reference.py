#!/usr/bin/env python3
"""A method against random pruning at the method's own schedule, on the embedded reference model.

    python experiments/studies/vs_random_reference.py --methods ppt atc --flops 0.7
    python experiments/studies/vs_random_reference.py --methods ppt atc tome --flops 0.85 0.7 0.55 --images 1000
    python experiments/studies/vs_random_reference.py --methods ppt --set threshold=6.6e-4

For each method and FLOPs target: the reference ViT's top-1 on its shipped Fashion-MNIST test images
(``vitcompress.evaluation.reference_model``, all 3,000 by default) and the agreement with the
uncompressed model's top-1; then random pruning (``vitcompress.testing.RandomPrune``) removing
exactly the tokens the method removed in every block (``r=`` its schedule), for ``--seeds`` seeds.
"""
import argparse
import time

import torch

import vitcompress
from vitcompress.evaluation import reference_model
from vitcompress.methods import REGISTRY
from vitcompress.testing import RandomPrune


@torch.no_grad()
def predictions(model, images, batch=250):
    return torch.cat([model(images[i:i + batch]).argmax(-1) for i in range(0, len(images), batch)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["ppt", "atc"])
    ap.add_argument("--flops", nargs="+", type=float, default=[0.7])
    ap.add_argument("--images", type=int, default=None, help="the first N reference images (default all 3000)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an option (a number) for every method that has it, e.g. threshold=6.6e-4")
    args = ap.parse_args(argv)
    settings = {k: float(v) for k, v in (item.split("=", 1) for item in args.set)}

    REGISTRY.setdefault(RandomPrune.name, RandomPrune())
    model, images, labels = reference_model.load(args.images)
    start = time.time()
    base = predictions(model, images)
    print(f"reference ViT, {len(images)} images: uncompressed top-1 {100 * (base == labels).float().mean():.2f}%")
    print("| method | flops= | schedule | top-1 | agree | random pruning at its schedule: top-1 mean (min-max) |")
    print("|---|---|---|---|---|---|")
    for method in args.methods:
        for flops in args.flops:
            options = {k: v for k, v in settings.items() if k in REGISTRY[method].defaults}
            vitcompress.compress(model, method, flops=flops, **options)
            pred = predictions(model, images)
            schedule = vitcompress.stats(model)["schedule"]
            rand = []
            for seed in range(args.seeds):
                vitcompress.compress(model, RandomPrune.name, r=list(schedule), seed=seed)
                rand.append(100 * float((predictions(model, images) == labels).float().mean()))
            vitcompress.restore(model)
            top1 = 100 * float((pred == labels).float().mean())
            agree = 100 * float((pred == base).float().mean())
            label = method + "".join(f", {k}={v:g}" for k, v in options.items())
            print(f"| {label} | {flops} | {schedule} | {top1:.2f} | {agree:.1f} | "
                  f"{sum(rand) / len(rand):.2f} ({min(rand):.2f}-{max(rand):.2f}) |", flush=True)
    print(f"({time.time() - start:.0f} s, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
