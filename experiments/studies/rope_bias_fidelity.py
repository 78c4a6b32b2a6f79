"""Fidelity of 'a merged token takes its destination's position' (EVA-02 rotary embeddings; BEiT
relative position bias) against pruning only, on random-weight models at their real size.

Per keep ratio: cosine similarity of the compressed model's outputs with the uncompressed ones, mean
over 8 images, for the pooled features (pre-logits; average pooling, where a merged token's size keeps
its patches' weight) and for the class token after the final norm (no pooling involved), for
  tome          merges (size-weighted), the merged token at its destination's position
  tome-prune    the same ToMe plans with every merge dropped (the sources pruned instead)
  zero_tprune   a pruning method (its own choice of tokens)
Images: smooth random images (7x7 noise upsampled bilinearly + 0.1 pixel noise), so that
neighbouring patches are alike, as in photos.
"""
import contextlib
import sys
from unittest import mock

import timm
import torch
import torch.nn.functional as F

import vitcompress
from vitcompress.interfaces import Plan
from vitcompress.methods import get

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
g = torch.Generator().manual_seed(0)
X = F.interpolate(torch.randn(8, 3, 7, 7, generator=g), size=224, mode="bilinear", align_corners=False)
X = X + 0.1 * torch.randn(X.shape, generator=g)


def features(model):
    """(pooled features, final class token)"""
    with torch.no_grad():
        tokens = model.forward_features(X)
        return model.forward_head(tokens, pre_logits=True), tokens[:, 0]


def build(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("relative_position_bias_table"):
                p.normal_()  # timm starts them at zero
    return model


def run(model, method, keep, prune_merges=False):
    tome = get("tome")
    plan = tome.plan

    def pruned(signals, remove, options):
        return Plan(keep=plan(signals, remove, options).keep)

    with mock.patch.object(tome, "plan", pruned) if prune_merges else contextlib.nullcontext():
        vitcompress.compress(model, method, keep=keep)
        out = features(model)
        tokens = vitcompress.stats(model)["tokens_per_layer"]
        vitcompress.restore(model)
    return out, tokens


for name in ("eva02_tiny_patch14_224", "beit_base_patch16_224"):
    model = build(name)
    ref = features(model)
    print(f"\n{name} (random weights, {X.shape[0]} smooth random images)")
    print("| keep | tokens in the last block | tome: pooled / class token | tome-prune: pooled / class token "
          "| zero_tprune: pooled / class token |")
    print("|---|---|---|---|---|")
    for keep in (0.9, 0.8, 0.7):
        cells, last = [], None
        for method, prune in (("tome", False), ("tome", True), ("zero_tprune", False)):
            out, tokens = run(model, method, keep, prune)
            last = tokens[-1]
            pooled, cls = (F.cosine_similarity(o, r).mean().item() for o, r in zip(out, ref))
            cells.append(f"{pooled:.4f} / {cls:.4f}")
        print(f"| {keep} | {last} | " + " | ".join(cells) + " |", flush=True)
