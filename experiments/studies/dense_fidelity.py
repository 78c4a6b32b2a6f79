"""Dense features with ``unmerge=True``: fidelity of the patch features on the real ViT-S/14 and the CPU
speed of a Depth-Anything-small-shaped model, in one run.

    PYTHONPATH=$PWD python experiments/studies/dense_fidelity.py             # the full run (idle machine)
    PYTHONPATH=$PWD nice -n 10 python experiments/studies/dense_fidelity.py --photos 8 --probe-train 60 \\
        --probe-test 30 --depth-size 266 --runs 2 --speed-flops 0.7          # a reduced run

For every static ViT method (``vitcompress.methods.names("vit")``) at each ``--flops``, compressed with
``unmerge=True`` so the final patch tokens come back on the 16x16 grid:

* **photos**: per-patch 1 - cos of the final patch features (after the final norm) against the uncompressed
  model, on crops of the real photos (:func:`vitcompress.evaluation.offline_data.load_photos`); mean and
  90th percentile over every patch of every crop.
* **probe**: a per-patch linear probe (ridge regression on the uncompressed model's patch features of
  ``--probe-train`` training images per data set) that tells foreground patches from background in MNIST
  and Fashion-MNIST (the label of a patch: its mean pixel above 0.2, from the pixels alone); accuracy and
  foreground IoU on ``--probe-test`` test images of the same probe on compressed and uncompressed features
  (the dense head stays the one trained on the uncompressed model, as it would in use).
* **FLOPs**: the compressed model's FLOPs over the uncompressed model's, as ``count_flops`` counts them (the
  unmerge's gathers cost no multiply-add; its final norm runs on every patch).
* **speed**: ``DepthAnythingForDepthEstimation`` shaped like Depth Anything small (a DINOv2 ViT-S/14
  backbone, its neck and head; random weights) at ``--depth-size`` px, uncompressed and every method at each
  ``--speed-flops``, timed in one interleaved run (:func:`vitcompress.profile.speed.compare_speed`); the
  FLOPs ratio there is of the whole model (the neck and head are not reduced). Device, dtype, batch,
  threads and load are printed: timings taken on a loaded machine are not results.
"""
import argparse
import copy
import os
import platform

import torch
import torch.nn.functional as F

import vitcompress
from vitcompress.evaluation import realvit
from vitcompress.evaluation.offline_data import load_digits, load_photos, to_input
from vitcompress.methods import names
from vitcompress.profile.flops import count_flops
from vitcompress.profile.speed import compare_speed

GRID = realvit.IMG_SIZE // 14  # 16 patches a side
FOREGROUND = 0.2  # mean pixel of a patch above which it is foreground


def patch_features(model, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Final patch tokens ``[n, 256, 384]`` (class token dropped)."""
    with torch.no_grad():
        return torch.cat([model.forward_features(x[i:i + batch])[:, 1:] for i in range(0, len(x), batch)])


def patch_labels(raw) -> torch.Tensor:
    """Foreground (1) / background (0) per patch of uint8 ``[n, 28, 28]`` digits, from their pixels as the
    model sees them (resized to 224 px, then averaged over each 14 px patch)."""
    pixels = F.interpolate(torch.as_tensor(raw).float().div(255).unsqueeze(1), size=(realvit.IMG_SIZE,) * 2,
                           mode="bilinear", align_corners=False)
    return (F.avg_pool2d(pixels, 14).flatten(1) > FOREGROUND).float()


def fit_probe(features: torch.Tensor, labels: torch.Tensor, ridge: float = 1.0):
    """Ridge regression of +-1 labels on standardised features (with a bias): ``(mean, std, weights)``."""
    f = features.reshape(-1, features.shape[-1]).double()
    mean, std = f.mean(0), f.std(0) + 1e-6
    a = torch.cat([(f - mean) / std, torch.ones(len(f), 1, dtype=f.dtype)], dim=1)
    y = labels.reshape(-1).double() * 2 - 1
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=f.dtype), a.T @ y)
    return mean, std, w


def probe_scores(probe, features: torch.Tensor, labels: torch.Tensor):
    """(accuracy, foreground IoU) of the probe's per-patch predictions."""
    mean, std, w = probe
    f = (features.reshape(-1, features.shape[-1]).double() - mean) / std
    pred = (f @ w[:-1] + w[-1]) > 0
    truth = labels.reshape(-1) > 0.5
    return (pred == truth).double().mean().item(), ((pred & truth).sum() / (pred | truth).sum()).item()


def one_minus_cos(a: torch.Tensor, b: torch.Tensor):
    d = 1 - F.cosine_similarity(a.double(), b.double(), dim=-1).flatten()
    return d.mean().item(), d.quantile(0.9).item()


def fidelity(args) -> None:
    model = realvit.load_realvit()
    photos = load_photos(args.photos, realvit.IMG_SIZE, realvit.MEAN, realvit.STD)
    base_photos = patch_features(model, photos)
    sets = {}
    for dataset in ("mnist", "fashion"):
        train, _ = load_digits(dataset, "train", args.probe_train)
        test, _ = load_digits(dataset, "test", args.probe_test)
        probe = fit_probe(patch_features(model, to_input(train, realvit.IMG_SIZE, realvit.MEAN, realvit.STD)),
                          patch_labels(train))
        x = to_input(test, realvit.IMG_SIZE, realvit.MEAN, realvit.STD)
        sets[dataset] = (probe, x, patch_labels(test))
    base_test = {d: patch_features(model, x) for d, (_, x, _) in sets.items()}
    base_flops = count_flops(model, photos[:1])
    print(f"\nreal ViT-S/14 (224 px, {GRID}x{GRID} patches), unmerge=True; photos: {len(photos)} crops; probe: "
          f"{args.probe_train} train / {args.probe_test} test images per data set, foreground patches "
          f"{100 * torch.cat([s[2] for s in sets.values()]).mean():.0f}%\n")
    print("| method | flops= | FLOPs counted | photos 1-cos mean | photos 1-cos p90 | MNIST probe acc / IoU "
          "| Fashion probe acc / IoU |")
    print("|---|---|---|---|---|---|---|")

    def row(name, budget, ratio, photo_feats, test_feats):
        cos = one_minus_cos(photo_feats, base_photos) if photo_feats is not base_photos else (0.0, 0.0)
        cells = [f"{100 * a:.1f}% / {i:.3f}" for a, i in (probe_scores(sets[d][0], test_feats[d], sets[d][2])
                                                          for d in sets)]
        print(f"| {name} | {budget} | {ratio:.3f} | {cos[0]:.2e} | {cos[1]:.2e} | {' | '.join(cells)} |", flush=True)

    row("uncompressed", "-", 1.0, base_photos, base_test)
    for flops in args.flops:
        for method in args.methods:
            vitcompress.compress(model, method, flops=flops, unmerge=True)
            try:
                ratio = count_flops(model, photos[:1]) / base_flops
                feats = {d: patch_features(model, x) for d, (_, x, _) in sets.items()}
                row(method, flops, ratio, patch_features(model, photos), feats)
            finally:
                vitcompress.restore(model)


def depth_anything_small(size: int):
    """``DepthAnythingForDepthEstimation`` shaped like Depth Anything small (random weights)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                            patch_size=14, image_size=size, layerscale_value=1.0,
                            out_features=["stage9", "stage10", "stage11", "stage12"], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=384, patch_size=14,
                                 neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, head_hidden_size=32,
                                 reassemble_factors=[4, 2, 1, 0.5])
    torch.manual_seed(0)
    return DepthAnythingForDepthEstimation(config).eval()


def speed(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    base = depth_anything_small(args.depth_size)
    x = torch.randn(args.batch, 3, args.depth_size, args.depth_size, generator=torch.Generator().manual_seed(0))
    models = {"uncompressed": base}
    for flops in args.speed_flops:
        for method in args.methods:
            models[f"{method} flops={flops}"] = vitcompress.compress(copy.deepcopy(base), method, flops=flops,
                                                                     unmerge=True)
    counted = {name: count_flops(m, x[:1]) for name, m in models.items()}
    load_before = os.getloadavg()
    result = compare_speed(models, x, warmup=args.warmup, runs=args.runs, latency=False, memory=False)
    load_after = os.getloadavg()
    attn = base.config.backbone_config._attn_implementation
    print(f"\nDepth-Anything-small-shaped model (random weights), {args.depth_size} px "
          f"({args.depth_size // 14}x{args.depth_size // 14} patches), unmerge=True\n"
          f"device cpu ({platform.processor() or platform.machine()}), dtype float32, batch {args.batch}, "
          f"threads {torch.get_num_threads()}, attention {attn}, runs {args.runs} (median), "
          f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after, torch {torch.__version__}\n")
    print("| model | whole-model FLOPs ratio | images/s | speedup |")
    print("|---|---|---|---|")
    ref = result["uncompressed"]["throughput"]
    for name in models:
        tput = result[name]["throughput"]
        print(f"| {name} | {counted[name] / counted['uncompressed']:.3f} | {tput:.3f} | {tput / ref:.2f}x |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=names("vit"), help="ViT methods (default: every one)")
    ap.add_argument("--flops", nargs="+", type=float, default=[0.85, 0.7, 0.55], help="fidelity budgets")
    ap.add_argument("--photos", type=int, default=32, help="crops of the real photos")
    ap.add_argument("--probe-train", type=int, default=300, help="training images per data set for the probe")
    ap.add_argument("--probe-test", type=int, default=200, help="test images per data set for the probe")
    ap.add_argument("--depth-size", type=int, default=518, help="input size of the depth model (px)")
    ap.add_argument("--speed-flops", nargs="+", type=float, default=[0.85, 0.7, 0.55], help="speed budgets")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-fidelity", action="store_true")
    args = ap.parse_args(argv)
    if not args.skip_fidelity:
        fidelity(args)
    if not args.skip_speed:
        speed(args)


if __name__ == "__main__":
    main()
