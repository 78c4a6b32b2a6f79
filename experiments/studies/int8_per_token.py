"""Would per-token activation ranges let int8 reach the first token reductions? (issue 31)

onnxruntime's static int8 quantizes each linear layer's input with one range per tensor, calibrated
on a few images; it has no per-token ranges, so this study simulates int8 in PyTorch instead
(fake quantization: round to the int8 grid, compute in float) on the reference model at 65%
FLOPs, with every linear layer int8 (``float_reductions=0``) except what the token choice reads --
the keys of each reducing block's qkv, and the queries for Zero-TPrune, computed from the unrounded
input as ``quantize_onnx`` does. Weights: per output channel, symmetric int8. Activations: uint8
with the zero in range, from

- ``per-tensor``: the min / max of the layer's input over the first 64 reference images (what
  onnxruntime's min/max calibration does: the check that the simulation matches it);
- ``per-token``: each token's own min / max (the patch's, for the patch embedding), at run time;
- ``weights only``: activations left in float, the bound of what any activation ranges can do.

Prints top-1 agreement with the fp32 PyTorch model on the 3,000 reference images.

    python experiments/studies/int8_per_token.py          # about 1 min on 2 cores
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import vitcompress
from vitcompress.evaluation import reference_model


def fake_uint8(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the uint8 grid spanning ``[min(low, 0), max(high, 0)]`` (broadcast)."""
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = ((high - low) / 255).clamp(min=1e-12)
    zero = torch.round(-low / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def fake_int8_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to symmetric int8, one scale per output channel."""
    scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp(min=1e-12) / 127
    return torch.clamp(torch.round(w / scale), -127, 127) * scale


def per_token(x: torch.Tensor, patch: int = 0) -> torch.Tensor:
    """``x`` with each token's own range: the last dimension of a token tensor, or each
    ``patch x patch`` patch (all channels) of an image."""
    if not patch:
        return fake_uint8(x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True))
    B, C, H, W = x.shape
    tiles = x.reshape(B, C, H // patch, patch, W // patch, patch)
    low, high = tiles.amin((1, 3, 5), keepdim=True), tiles.amax((1, 3, 5), keepdim=True)
    return fake_uint8(tiles, low, high).reshape(B, C, H, W)


class Int8Layers:
    """The model's Conv2d / Linear layers replaced by fake-int8 ones; ``float_parts[name]`` lists
    the output chunks of a fused qkv (``"q"``, ``"k"``) computed in float from the unrounded input."""

    def __init__(self, model: nn.Module, float_parts):
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        self.float_parts, self.ranges, self.mode = float_parts, {}, "calibrate"
        for name, layer in self.layers.items():
            layer.forward = self._forward(name, layer)

    def _rounded(self, name, layer, x):
        conv = isinstance(layer, nn.Conv2d)
        if self.mode == "calibrate":
            low, high = self.ranges.get(name, (x.min(), x.max()))
            self.ranges[name] = (torch.minimum(low, x.min()), torch.maximum(high, x.max()))
            return x
        if self.mode == "per-tensor":
            return fake_uint8(x, *self.ranges[name])
        if self.mode == "weights only":
            return x
        return per_token(x, layer.kernel_size[0] if conv else 0)

    def _forward(self, name, layer):
        def forward(x):
            rounded = self._rounded(name, layer, x)
            if self.mode == "calibrate":
                weight = layer.weight
            else:
                weight = fake_int8_weight(layer.weight)
            if isinstance(layer, nn.Conv2d):
                return layer._conv_forward(rounded, weight, layer.bias)
            out = F.linear(rounded, weight, layer.bias)
            parts = self.float_parts.get(name, "")
            if parts and self.mode != "calibrate":
                width = layer.out_features // 3
                exact = F.linear(x, layer.weight, layer.bias)
                for i, part in enumerate("qkv"):
                    if part in parts:
                        out[..., i * width:(i + 1) * width] = exact[..., i * width:(i + 1) * width]
            return out
        return forward


def _predict(model, images):
    with torch.no_grad():
        return torch.cat([model(images[i:i + 500]).argmax(1) for i in range(0, len(images), 500)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["none", "tome", "pitome", "zero_tprune"])
    ap.add_argument("--flops", type=float, default=0.65)
    ap.add_argument("--calibration-images", type=int, default=64)
    args = ap.parse_args(argv)

    start = time.perf_counter()
    _, images, _ = reference_model.load()
    print("| method | per-tensor ranges (onnxruntime's kind) | per-token ranges | weights only |")
    print("|---|---|---|---|")
    for method in args.methods:
        model, _, _ = reference_model.load(num_images=1)
        if method != "none":
            vitcompress.compress(model, method, flops=args.flops)
        reads = {"none": "", "zero_tprune": "qk"}.get(method, "k")
        schedule = vitcompress.stats(model)["schedule"] if method != "none" else []
        float_parts = {f"blocks.{i}.attn.qkv": reads for i, removed in enumerate(schedule) if removed}
        top = _predict(model, images)
        layers = Int8Layers(model, float_parts)
        _predict(model, images[:args.calibration_images])
        cells = []
        for mode in ("per-tensor", "per-token", "weights only"):
            layers.mode = mode
            cells.append(f"{100 * (_predict(model, images) == top).float().mean():.2f}%")
        name = method if method == "none" else f"{method} flops={args.flops:g}"
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nReference model, {len(images)} images; simulated int8, every linear layer but the scoring parts "
          f"(float_reductions=0), per-tensor ranges from the first {args.calibration_images} images; top-1 "
          f"agreement with fp32 PyTorch; torch {torch.__version__}; {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
