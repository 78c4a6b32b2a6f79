"""Fixed-seed outputs of every method on every model family, to prove a refactor changes nothing.

    python experiments/tools/method_outputs.py --save /tmp/before.pt    # on the old code
    python experiments/tools/method_outputs.py --check /tmp/before.pt   # on the new code: bit for bit

The tiny random models the tests use (``vitcompress.testing``: timm ViT variants, open_clip and
transformers CLIP towers, DETR, LLaVA) and the embedded reference model on its real images; CPU,
float32 (and one bfloat16 autocast case). Each case records the model's outputs and what ``vitcompress.stats`` reports.
"""
import argparse
import sys

import torch

import vitcompress
from vitcompress.testing import (LLAVA_CASES, OPEN_CLIP_VARIANTS, half_flat, llava_inputs, random_images,
                                 random_scorer_head, tiny_clip, tiny_detr, tiny_llava, tiny_vit)

VIT_METHODS = [("tome", dict(r=4)), ("tome", dict(r=(4, 0.5), prop_attn=False)), ("pitome", dict(keep=0.9)),
               ("pitome", dict(keep=0.8, bipartite_first_half=False)), ("zero_tprune", dict(keep=0.8)),
               ("zero_tprune", dict(keep=0.8, s_ratio=0.0, cls_init="uniform")),
               ("zero_tprune", dict(keep=0.8, order="IS", head_filter=False)), ("tome", dict(r=3, trace_source=True))]


def _stats(model):
    keep = ("tokens_per_layer", "planned_tokens_per_layer", "source", "kept_per_image", "dual_tokens_per_layer",
            "visual_tokens_after", "encoder_tokens")
    return {k: v for k, v in vitcompress.stats(model).items() if k in keep}


def _vit_cases():
    x = random_images(3, seed=0)
    variants = {"plain": {}, "registers_avg": dict(class_token=False, reg_tokens=2, global_pool="avg"),
                "layerscale_qknorm": dict(init_values=0.1, qk_norm=True)}
    for vname, kw in variants.items():
        for method, opts in VIT_METHODS:
            model = tiny_vit(**kw)
            vitcompress.compress(model, method, **opts)
            with torch.no_grad():
                out = model(x)
            yield f"timm-{vname}-{method}-{opts}", out, _stats(model)
    from timm.models.deit import VisionTransformerDistilled
    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=4, num_classes=10, embed_dim=48, depth=4,
                                       num_heads=3).eval()
    for method, opts in VIT_METHODS[:5]:
        vitcompress.compress(model, method, **opts)
        with torch.no_grad():
            out = model(x)
        yield f"deit-distilled-{method}-{opts}", out, _stats(model)
    model = tiny_vit()
    vitcompress.compress(model, "pitome", keep=0.9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    yield "timm-bf16-pitome", out.float(), _stats(model)


def _reference_cases():
    from vitcompress.evaluation import reference_model as reference
    model, images, _ = reference.load(num_images=256)
    for method in ("tome", "pitome", "zero_tprune"):
        vitcompress.compress(model, method, flops=0.7)
        with torch.no_grad():
            out = model(images)
        yield f"reference-{method}", out, _stats(model)


def _clip_cases():
    try:
        import open_clip  # noqa: F401
    except ImportError as err:
        print("skip open_clip:", err)
        return
    images = random_images()
    for variant in ("tok", "avg", "attn_pool", "custom_block"):
        for method in ("tome", "pitome", "zero_tprune"):
            model = tiny_clip(**OPEN_CLIP_VARIANTS[variant])
            vitcompress.compress(model, method, keep=0.8)
            with torch.no_grad():
                out = model.encode_image(images)
            yield f"open_clip-{variant}-{method}", out, _stats(model)
    from transformers import CLIPVisionConfig, CLIPVisionModel
    for method in ("tome", "pitome", "zero_tprune"):
        torch.manual_seed(0)
        model = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                                 num_attention_heads=4, image_size=32, patch_size=4)).eval()
        vitcompress.compress(model, method, keep=0.8)
        with torch.no_grad():
            out = model(pixel_values=images, output_hidden_states=True)
        yield f"hf_clip-{method}", [out.pooler_output, out.last_hidden_state, *out.hidden_states], _stats(model)


def _detr_cases():
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 64, 80, dtype=torch.long)
    mask[1, :, 56:] = 0
    for scorer, extra in (("norm", {}), ("attention", {}), ("learned", dict(scorer_module=random_scorer_head())),
                          ("norm", dict(dual_k=0))):
        model = tiny_detr()
        vitcompress.compress(model, "focus_detr", keep=0.5, scorer=scorer, **extra)
        with torch.no_grad():
            out = model(pixel_values=x, pixel_mask=mask, output_hidden_states=True)
        yield (f"detr-{scorer}-{sorted(extra)}", [out.logits, out.pred_boxes, *out.encoder_hidden_states],
               _stats(model))


def _llava_cases():
    models = {}
    for kind, method, opts in LLAVA_CASES + [("llava", "tokencorr", dict(merge=True)),
                                             ("next", "tokencorr", dict(merge=True))]:
        if kind not in models:
            models[kind] = tiny_llava(kind)
        model = models[kind]
        inputs = llava_inputs(model, kind, half_flat)
        vitcompress.compress(model, method, **opts)
        with torch.no_grad():
            out = model(**inputs, question="what?") if method == "quota" else model(**inputs)
        yield f"llava-{kind}-{method}-{sorted(opts)}", out.logits, _stats(model)
        vitcompress.restore(model)


def collect():
    results = {}
    for cases in (_vit_cases, _reference_cases, _clip_cases, _detr_cases, _llava_cases):
        for name, out, stats in cases():
            results[name] = {"out": out, "stats": stats}
            print(f"  {name}", flush=True)
    return results


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", help="record the outputs to this file")
    group.add_argument("--check", help="compare the outputs with this recording, bit for bit")
    args = ap.parse_args()
    torch.set_num_threads(1)  # thread count can change reduction order
    results = collect()
    if args.save:
        torch.save(results, args.save)
        print(f"saved {len(results)} cases to {args.save}")
        return 0
    before = torch.load(args.check, weights_only=False)
    differ = [k for k in before if k not in results or not _equal(before[k], results[k])]
    new = [k for k in results if k not in before]
    for k in differ:
        print("DIFFERS:", k)
    print(f"{len(before) - len(differ)} of {len(before)} cases bit-identical; {len(new)} new")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
