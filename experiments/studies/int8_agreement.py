"""How many leading token reductions int8 must leave in float: top-1 agreement with fp32 PyTorch.

For each static ViT method at 65% FLOPs on the reference model, exports the fp32 ONNX file once,
quantizes it with ``float_reductions`` = 0, 1, 2, 3 (``vitcompress.export.quantize_onnx``, calibrated
on the first 64 reference images) and runs every file on the 3,000 reference images in
onnxruntime: top-1 agreement with the same compressed model in fp32 PyTorch, and top-1 accuracy on
the labels. The last columns are the method's own noise floor: the fp32 PyTorch model's agreement
with itself when Gaussian noise of std ``sigma`` (in normalized-input units; one grey level is
about 0.011) is added to the images -- how far an int8-sized perturbation moves its choices.

    python experiments/studies/int8_agreement.py                  # about 4 min on 2 cores
    python experiments/studies/int8_agreement.py --methods pitome --float-reductions 0 2
    python experiments/studies/int8_agreement.py --realvit        # the real ViT-S/14, photos; about 15 min
    python experiments/studies/int8_agreement.py --calibration-method percentile   # or entropy (default minmax)

``--realvit``: the pretrained ViT-S/14 (``vitcompress.evaluation.realvit``; no classes, so no top-1) at
70% FLOPs on 96 crops of real photos (``vitcompress.evaluation.offline_data``), calibrated on 64 other
crops: mean and max ``1 - cos`` between the int8 file's and fp32 PyTorch's embeddings, beside what
the compression itself costs (fp32 compressed vs uncompressed) and the input-noise floor.
"""
import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

import vitcompress
from vitcompress.evaluation import realvit, reference_model
from vitcompress.evaluation.offline_data import load_photos
from vitcompress.export import (CALIBRATION_METHODS, FLOAT_REDUCTIONS, export_onnx, ort_session, quantize_onnx,
                                verify_onnx)

BATCH = 8


def _predict(model, images, noise: float = 0.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 500):
            x = images[i:i + 500]
            if noise:
                x = x + noise * torch.randn(x.shape, generator=generator)
            out.append(model(x).argmax(1))
    return torch.cat(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["none", "tome", "pitome", "zero_tprune"])
    ap.add_argument("--flops", type=float, default=0.65)
    ap.add_argument("--float-reductions", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--noise", type=float, nargs="*", default=[1e-3, 1e-2], help="fp32 noise-floor sigmas (none: skip)")
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="minmax",
                    help="onnxruntime's activation-range calibration")
    ap.add_argument("--realvit", action="store_true", help="the real ViT-S/14 on photos (1 - cos of embeddings)")
    args = ap.parse_args(argv)
    if args.realvit:
        return realvit_table(args)

    start = time.perf_counter()
    model, images, labels = reference_model.load()
    calibration = images[:args.calibration_images]
    head = "| " + " | ".join(["method", "fp32 top-1"] + [f"int8 fr={k}" for k in args.float_reductions]
                             + [f"fp32, noise {s:g}" for s in args.noise]) + " |"
    rows = []
    with tempfile.TemporaryDirectory(prefix="int8_agreement_") as folder:
        for method in args.methods:
            model, _, _ = reference_model.load(num_images=1)
            if method != "none":
                vitcompress.compress(model, method, flops=args.flops)
            fp32 = os.path.join(folder, f"{method}.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                export_onnx(model, fp32, (BATCH,) + tuple(images.shape[1:]), verbose=False)
            top = _predict(model, images)
            cells = [f"{100 * (top == labels).float().mean():.2f}"]
            for count in args.float_reductions:
                path = os.path.join(folder, f"{method}-int8-{count}.onnx")
                quantized = quantize_onnx(fp32, path, calibration, batch_size=BATCH, float_reductions=count,
                                          calibration_method=args.calibration_method)
                check = verify_onnx(ort_session(path), model, images, BATCH)
                cells.append(f"{100 * check['top1_agreement']:.2f}% ({len(quantized)} int8)")
                print(f"{method} float_reductions={count}: {len(quantized)} linear layers int8, top-1 agreement "
                      f"{100 * check['top1_agreement']:.2f}%, max abs diff {check['max_abs_diff']:.3g} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
            for sigma in args.noise:
                cells.append(f"{100 * (_predict(model, images, sigma) == top).float().mean():.2f}%")
            rows.append(f"| {method if method == 'none' else f'{method} flops={args.flops:g}'} | "
                        + " | ".join(cells) + " |")
    print()
    print(f"Reference model, {len(images)} images, int8 calibrated ({args.calibration_method}) on the first "
          f"{len(calibration)}; top-1 agreement "
          f"of the int8 file with fp32 PyTorch (number of int8 linear layers); the library default is "
          f"float_reductions={FLOAT_REDUCTIONS}; torch {torch.__version__}; {time.perf_counter() - start:.0f} s")
    print(head)
    print("|" + "---|" * (2 + len(args.float_reductions) + len(args.noise)))
    print("\n".join(rows))
    return 0


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def realvit_table(args) -> int:
    start = time.perf_counter()
    flops = 0.7 if args.flops == 0.65 else args.flops
    images = load_photos(96, realvit.IMG_SIZE, realvit.MEAN, realvit.STD, seed=0)
    calibration = load_photos(args.calibration_images, realvit.IMG_SIZE, realvit.MEAN, realvit.STD,
                                             seed=1)
    with torch.no_grad():
        reference = torch.cat([realvit.load_realvit()(images[i:i + 16]) for i in range(0, len(images), 16)])
    rows = []
    with tempfile.TemporaryDirectory(prefix="int8_agreement_") as folder:
        for method in args.methods:
            model = realvit.load_realvit()
            if method != "none":
                vitcompress.compress(model, method, flops=flops)
            with torch.no_grad():
                fp32_out = torch.cat([model(images[i:i + 16]) for i in range(0, len(images), 16)])
            fp32 = os.path.join(folder, f"{method}.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                export_onnx(model, fp32, (BATCH, 3, realvit.IMG_SIZE, realvit.IMG_SIZE), verbose=False)
            cells = [f"{_one_minus_cos(fp32_out, reference).mean():.2e}"]
            for count in args.float_reductions:
                path = os.path.join(folder, f"{method}-int8-{count}.onnx")
                quantized = quantize_onnx(fp32, path, calibration, batch_size=BATCH, float_reductions=count,
                                          calibration_method=args.calibration_method)
                session = ort_session(path)
                out = torch.cat([torch.from_numpy(session.run(None, {"images": images[i:i + BATCH].numpy()})[0])
                                 for i in range(0, len(images), BATCH)])
                gap = _one_minus_cos(out, fp32_out)
                cells.append(f"{gap.mean():.2e} / {gap.max():.2e} ({len(quantized)} int8)")
                print(f"{method} float_reductions={count}: {len(quantized)} linear layers int8, 1-cos vs fp32 mean "
                      f"{gap.mean():.3g} max {gap.max():.3g} ({time.perf_counter() - start:.0f} s)", flush=True)
            for sigma in args.noise:
                generator = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    noisy = torch.cat([model(images[i:i + 16] + sigma * torch.randn(images[i:i + 16].shape,
                                                                                     generator=generator))
                                       for i in range(0, len(images), 16)])
                cells.append(f"{_one_minus_cos(noisy, fp32_out).mean():.2e}")
            rows.append(f"| {method if method == 'none' else f'{method} flops={flops:g}'} | " + " | ".join(cells) + " |")
    print()
    print(f"Real ViT-S/14, {len(images)} photo crops, int8 calibrated ({args.calibration_method}) on "
          f"{len(calibration)} other crops; mean / max "
          f"1 - cos of the int8 file's embedding vs fp32 PyTorch (number of int8 linear layers); library default "
          f"float_reductions={FLOAT_REDUCTIONS}; torch {torch.__version__}; {time.perf_counter() - start:.0f} s")
    print("| " + " | ".join(["method", "fp32 compressed vs uncompressed"]
                            + [f"int8 fr={k}" for k in args.float_reductions]
                            + [f"fp32, noise {s:g}" for s in args.noise]) + " |")
    print("|" + "---|" * (2 + len(args.float_reductions) + len(args.noise)))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
