"""Compressed vs uncompressed models in edge runtimes on this machine's CPU.

Exports a timm ViT (random weights, so no download) uncompressed and compressed with each setting,
checks each file against PyTorch, then times every (setting, runtime, batch size) in one interleaved
run (every round runs each once, rotating who goes first, so machine noise hits them alike) and
prints, per batch size, each runtime's compressed-vs-uncompressed throughput ratio and that ratio as
a fraction of the ideal (the FLOPs speedup counted by ``vitcompress.count_flops``), with the
threads and the load average (timings are valid only on an idle machine). Runtimes: fp32 onnxruntime, int8 onnxruntime (static QDQ quantization
of the linear layers, calibrated on 64 random-normal inputs: random weights have no real images;
the inputs of the first --float-reductions token reductions in float, as ``export_onnx`` does),
OpenVINO (fp32, when installed) and, with --executorch, ExecuTorch with XNNPACK. "ideal" is the
compressed throughput over (uncompressed throughput in the same runtime x the FLOPs speedup): 1.00 is
the whole FLOPs saving.

    python experiments/benchmarks/bench_onnx.py --executorch      # deit_small, 3 methods at 65% FLOPs, batch 16 and 1
    python experiments/benchmarks/bench_onnx.py --batch-sizes 16 --runs 5
    python experiments/benchmarks/bench_onnx.py --model deit_tiny_patch16_224 --settings tome:r=13 pitome:keep=0.9

Each export takes one to a few minutes of CPU (torch.export + ONNX conversion of a 12-block graph);
an ExecuTorch lowering several more.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

import vitcompress
from vitcompress.export import (FLOAT_REDUCTIONS, export_onnx, openvino_session, ort_session, quantize_onnx,
                                verify_onnx)
from vitcompress.cli.settings import describe, parse_setting


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(runners, warmup: int, runs: int):
    """``{name: [seconds per run]}``; each round runs every model once, in a rotating order."""
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    times = {n: [] for n in names}
    for i in range(runs):
        for name in names[i % len(names):] + names[: i % len(names)]:
            times[name].append(_timed(runners[name]))
    return times


#: Largest difference from PyTorch of an image computed by a reused fp32 file of this model.
REUSE_ATOL = 1e-3


def _refuse_stale(path: str, per_image: torch.Tensor) -> None:
    """Stop before timing a reused file that does not compute this model (other weights, an older
    export): most of its images differ. A few may differ in a file of this very model, where a
    near-tie in the token ranking went the other way (PiToMe's energies)."""
    differ = int((per_image > REUSE_ATOL).sum())
    if 2 * differ > len(per_image):
        raise SystemExit(f"{path} differs from this model on {differ} of {len(per_image)} images (by more than "
                         f"{REUSE_ATOL:g}): it was exported from another model or version; delete it and run "
                         "again to export it anew")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224", help="timm model (random weights)")
    ap.add_argument("--settings", nargs="+",
                    default=["tome:flops=0.65", "pitome:flops=0.65", "zero_tprune:flops=0.65"],
                    help="method:budget settings (default: %(default)s)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1],
                    help="timed batch sizes, all in one interleaved run (default: 16 1)")
    ap.add_argument("--runs", type=int, default=7, help="timed interleaved rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads of every runtime")
    ap.add_argument("--out-dir", help="keep the exported files here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true",
                    help="take the files already in --out-dir (exported by an earlier run with the same model and "
                         "settings) instead of exporting again: export under load, time later on an idle machine")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 onnxruntime column")
    ap.add_argument("--float-reductions", type=int, default=FLOAT_REDUCTIONS, metavar="N",
                    help="int8: leading token reductions whose inputs stay in float (default: %(default)s)")
    ap.add_argument("--no-openvino", action="store_true", help="skip the OpenVINO column")
    ap.add_argument("--executorch", action="store_true",
                    help="add the ExecuTorch (XNNPACK) column (its lowering takes minutes per model)")
    ap.add_argument("--torch", action="store_true", help="also time the PyTorch eager models in the same run")
    args = ap.parse_args(argv)
    if min(args.batch_sizes) < 1:
        ap.error("--batch-sizes must be >= 1")
    if args.reuse and not args.out_dir:
        ap.error("--reuse takes the files of an earlier run: give its --out-dir")

    import onnxruntime as ort
    import timm

    runtimes = ["ORT fp32"] + ([] if args.no_int8 else ["ORT int8"])
    if not args.no_openvino:
        if importlib.util.find_spec("openvino") is None:
            print("openvino not installed: no OpenVINO column (pip install openvino)")
        else:
            runtimes.append("OpenVINO")
    if args.executorch:
        runtimes.append("ExecuTorch")
    if args.torch:
        runtimes.append("torch")

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="bench_onnx_")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval()
    image = tuple(base.pretrained_cfg.get("input_size", (3, 224, 224)))
    top = max(args.batch_sizes)
    inputs = {b: torch.randn((b,) + image) for b in args.batch_sizes}
    calibration = torch.randn((64,) + image, generator=torch.Generator().manual_seed(1))

    rows, runners = [], {}  # runners[(label, runtime)] = callable(batch)
    start = time.perf_counter()
    for text in ["uncompressed"] + list(args.settings):
        model = timm.create_model(args.model).eval()
        model.load_state_dict(base.state_dict())
        label = "uncompressed"
        if text != "uncompressed":
            method, kwargs = parse_setting(text)
            vitcompress.compress(model, method, **kwargs)
            label = f"{method}:{describe(kwargs)}"
        stem = os.path.join(out_dir, f"{args.model}-{label.replace(':', '-').replace(',', '_')}")
        t0 = time.perf_counter()
        reuse = args.reuse and os.path.exists(stem + ".onnx")
        if reuse:
            check = verify_onnx(ort_session(stem + ".onnx"), model, inputs[top])
            print(f"reused {stem}.onnx: max abs diff vs PyTorch {check['max_abs_diff']:.2g}", flush=True)
            _refuse_stale(stem + ".onnx", check["per_image"])
        else:
            with warnings.catch_warnings():  # a near-tie flip is reported on the line below
                warnings.simplefilter("ignore", RuntimeWarning)
                report = export_onnx(model, stem + ".onnx", (top,) + image, check_batches=(1, top), verbose=False)
            name = f"random, batch {top}"
            print(f"exported {label}: {report.nodes} nodes, max abs diff vs PyTorch {report.max_abs_diff:.2g} "
                  f"({report.within(name)}/{top} images within {report.atol:g} at batch {top}; "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
        sessions = {"ORT fp32": ort_session(stem + ".onnx")}
        if "ORT int8" in runtimes:
            if not (args.reuse and os.path.exists(stem + "-int8.onnx")):
                quantize_onnx(stem + ".onnx", stem + "-int8.onnx", calibration, batch_size=top,
                              float_reductions=args.float_reductions)
            sessions["ORT int8"] = ort_session(stem + "-int8.onnx")
            check = verify_onnx(sessions["ORT int8"], model, inputs[top])
            print(f"  int8: max abs diff vs fp32 PyTorch {check['max_abs_diff']:.3g} (median "
                  f"{check['median_abs_diff']:.3g}), top-1 agreement {100 * check['top1_agreement']:.0f}% "
                  f"on {top} random inputs", flush=True)
        if "OpenVINO" in runtimes:
            sessions["OpenVINO"] = openvino_session(stem + ".onnx", threads=args.threads)
            check = verify_onnx(sessions["OpenVINO"], model, inputs[top])
            print(f"  OpenVINO: max abs diff vs PyTorch {check['max_abs_diff']:.2g}", flush=True)
        for runtime, session in sessions.items():
            feed_name = session.get_inputs()[0].name
            runners[label, runtime] = (lambda b, s=session, n=feed_name: s.run(None, {n: inputs[b].numpy()}))
        if "ExecuTorch" in runtimes:
            from executorch.runtime import Runtime
            from vitcompress.export import export_executorch

            t0 = time.perf_counter()
            reuse = args.reuse and os.path.exists(stem + ".pte")
            if not reuse:
                et = export_executorch(model, stem + ".pte", (top,) + image, max_batch=max(2, top),
                                       check_batches=(1, top) if top > 1 else (1, 2), verbose=False)
                print(f"  ExecuTorch: max abs diff vs PyTorch {et.max_abs_diff:.2g}, {et.delegated} XNNPACK "
                      f"subgraphs, {sum(et.portable_ops.values())} ops outside ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
            forward = Runtime.get().load_program(stem + ".pte").load_method("forward")
            if reuse:  # a file of an earlier run: checked against this model before it is timed
                per_image = (forward.execute([inputs[top]])[0] - _no_grad(model, inputs[top])).abs().flatten(1).amax(1)
                print(f"  ExecuTorch: reused {stem}.pte, max abs diff vs PyTorch {per_image.max().item():.2g}", flush=True)
                _refuse_stale(stem + ".pte", per_image)
            runners[label, "ExecuTorch"] = (lambda b, f=forward: f.execute([inputs[b]]))
        if args.torch:
            runners[label, "torch"] = (lambda b, m=model: _no_grad(m, inputs[b]))
        gflops = vitcompress.count_flops(model, inputs[top][:1]) / 1e9
        tokens = vitcompress.stats(model)["planned_tokens_per_layer"] if text != "uncompressed" else None
        rows.append({"label": label, "gflops": gflops, "tokens": tokens})

    base_row = rows[0]
    # one interleaved run over every (setting, runtime, batch size): machine noise hits them alike
    times = interleaved({(label, runtime, batch): (lambda f=fn, b=batch: f(b))
                         for (label, runtime), fn in runners.items() for batch in args.batch_sizes},
                        args.warmup, args.runs)
    ips = {key: key[2] / statistics.median(t) for key, t in times.items()}
    print()
    print(f"{args.model} (random weights), float32 inputs, CPU ({os.cpu_count()} cores), {args.threads} threads, "
          f"{args.runs} interleaved rounds over batch sizes {args.batch_sizes}; load average before "
          f"{load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (timings are valid only on an idle machine); "
          f"onnxruntime {ort.__version__}, {_versions()}torch {torch.__version__}; "
          f"{time.perf_counter() - start:.0f} s" + ("" if args.no_int8 else
                                                    f"; int8 with float_reductions={args.float_reductions}"))
    print("Each runtime: median img/s, the speedup over the uncompressed model in the same runtime, and that "
          "speedup as a fraction of the ideal one (the FLOPs speedup, uncompressed GFLOPs / compressed GFLOPs).")
    for batch in args.batch_sizes:
        print()
        print(f"batch {batch}")
        head = f"{'setting':<22}{'GFLOPs':>8}{'FLOPs ratio':>12}" + "".join(f"{r:>28}" for r in runtimes)
        print(head)
        print("-" * len(head))
        for row in rows:
            name, ratio = row["label"], row["gflops"] / base_row["gflops"]
            line = f"{name:<22}{row['gflops']:>8.3f}{ratio:>12.3f}"
            for runtime in runtimes:
                value = ips[name, runtime, batch]
                speedup = value / ips["uncompressed", runtime, batch]
                line += f"{value:>12.1f} {speedup:>5.2f}x {speedup * ratio:>5.2f} ideal"
            print(line)
    for row in rows[1:]:
        print(f"  {row['label']}: tokens per block {row['tokens']}")
    return 0


def _versions() -> str:
    from importlib import metadata

    found = []
    for dist in ("openvino", "executorch"):
        try:
            found.append(f"{dist} {metadata.version(dist)}, ")
        except metadata.PackageNotFoundError:
            pass
    return "".join(found)


def _no_grad(model, x):
    with torch.no_grad():
        return model(x)


if __name__ == "__main__":
    sys.exit(main())
