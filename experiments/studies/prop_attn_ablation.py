"""Proportional attention on and off for the merging methods.

    python experiments/studies/prop_attn_ablation.py            # the embedded reference model, 3,000 images
    python experiments/studies/prop_attn_ablation.py --realvit  # + the real ViT-S/14 on 96 crops of real photos

Reference model: top-1, top-1 agreement with the uncompressed model, KL of the logits and
1 - cosine of the logits. Real ViT-S/14 (``vitcompress.evaluation.realvit``; photos from
``vitcompress.evaluation.offline_data``): 1 - cosine of the output embedding at ``flops=0.7``.
"""
import argparse

import torch
import torch.nn.functional as F

import vitcompress
from vitcompress.evaluation import realvit, reference_model
from vitcompress.evaluation.offline_data import load_photos


def reference_rows():
    model, images, labels = reference_model.load()
    with torch.no_grad():
        base = model(images)
    print(f"reference model, {len(images)} images, base top-1 {100 * (base.argmax(-1) == labels).float().mean().item():.2f}")

    def run(method, **kw):
        vitcompress.compress(model, method, **kw)
        with torch.no_grad():
            out = model(images)
        vitcompress.restore(model)
        top1 = (out.argmax(-1) == labels).float().mean().item()
        agree = (out.argmax(-1) == base.argmax(-1)).float().mean().item()
        kl = F.kl_div(out.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean").item()
        cos = 1 - F.cosine_similarity(out, base, dim=-1).mean().item()
        print(f"  {method:8s} {str(kw):40s} top-1 {100 * top1:.2f} agree {100 * agree:.1f} KL {kl:.4f} "
              f"1-cos(logits) {cos:.2e}", flush=True)

    for keep in (0.9, 0.8, 0.7):
        for pa in (True, False):
            run("pitome", keep=keep, prop_attn=pa)
    for r in (4, 6):
        for pa in (True, False):
            run("tome", r=r, prop_attn=pa)


def realvit_rows(num_photos: int):
    model = realvit.load_realvit()
    x = load_photos(num_photos, realvit.IMG_SIZE, realvit.MEAN, realvit.STD)
    with torch.no_grad():
        base = model(x)
    print(f"real ViT-S/14, {num_photos} crops of real photos, flops=0.7: 1 - cos of the embedding")
    for method in ("tome", "pitome"):
        for pa in (True, False):
            vitcompress.compress(model, method, flops=0.7, prop_attn=pa)
            with torch.no_grad():
                out = model(x)
            macs = vitcompress.stats(model)["tokens_per_layer"]
            vitcompress.restore(model)
            cos = (1 - F.cosine_similarity(out.double(), base.double(), dim=-1)).mean().item()
            print(f"  {method:8s} prop_attn={str(pa):5s} 1-cos {cos:.2e}  tokens {macs}", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--realvit", action="store_true", help="also the real ViT-S/14 on real photos")
    p.add_argument("--num-photos", type=int, default=96)
    args = p.parse_args()
    reference_rows()
    if args.realvit:
        realvit_rows(args.num_photos)
