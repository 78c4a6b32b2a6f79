"""Compressed vs uncompressed ONNX models in onnxruntime on this machine's CPU.

Exports a timm ViT (random weights, so no download) uncompressed and compressed with each setting,
checks each file against PyTorch, then times all sessions in one interleaved run (every round
runs each model once, rotating who goes first, so machine noise hits them alike) and prints the
throughput ratio next to the FLOPs ratio counted by ``vitcompress.count_flops``.

    python experiments/bench_onnx.py                                   # deit_small, 3 methods at 65% FLOPs
    python experiments/bench_onnx.py --model deit_tiny_patch16_224 --settings tome:r=13 pitome:keep=0.9

Each export takes one to a few minutes of CPU (torch.export + ONNX conversion of a 12-block graph).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

import vitcompress
from vitcompress.export import export_onnx, ort_session
from vitcompress.settings import describe, parse_setting


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224", help="timm model (random weights)")
    ap.add_argument("--settings", nargs="+",
                    default=["tome:flops=0.65", "pitome:flops=0.65", "zero_tprune:flops=0.65"],
                    help="method:budget settings (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=7, help="timed interleaved rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="onnxruntime intra-op threads")
    ap.add_argument("--out-dir", help="keep the .onnx files here (default: a temporary folder)")
    ap.add_argument("--torch", action="store_true", help="also time the PyTorch eager models in the same run")
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import timm

    torch.set_num_threads(args.threads)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="bench_onnx_")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    base = timm.create_model(args.model).eval()
    image = tuple(base.pretrained_cfg.get("input_size", (3, 224, 224)))
    x = torch.randn((args.batch_size,) + image)
    feed = x.numpy()

    rows, runners = [], {}
    start = time.perf_counter()
    for text in ["uncompressed"] + list(args.settings):
        model = timm.create_model(args.model).eval()
        model.load_state_dict(base.state_dict())
        label = "uncompressed"
        if text != "uncompressed":
            method, kwargs = parse_setting(text)
            vitcompress.compress(model, method, **kwargs)
            label = f"{method}:{describe(kwargs)}"
        path = os.path.join(out_dir, f"{args.model}-{label.replace(':', '-').replace(',', '_')}.onnx")
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # a near-tie flip is reported on the line below
            warnings.simplefilter("ignore", RuntimeWarning)
            report = export_onnx(model, path, (args.batch_size,) + image, check_batches=(1, args.batch_size),
                                 verbose=False)
        name = f"random, batch {args.batch_size}"
        print(f"exported {label}: {report.nodes} nodes, max abs diff vs PyTorch {report.max_abs_diff:.2g} "
              f"({report.within(name)}/{args.batch_size} images within {report.atol:g} at batch {args.batch_size}; "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
        gflops = vitcompress.count_flops(model, x[:1]) / 1e9
        tokens = vitcompress.stats(model)["planned_tokens_per_layer"] if text != "uncompressed" else None
        session = ort_session(path)
        session_name = session.get_inputs()[0].name
        runners[label] = (lambda s=session, n=session_name: s.run(None, {n: feed}))
        if args.torch:
            runners[f"{label} [torch]"] = (lambda m=model: _no_grad(m, x))
        rows.append({"label": label, "gflops": gflops, "tokens": tokens, "diff": report.max_abs_diff})

    times = interleaved(runners, args.warmup, args.runs)
    ips = {name: args.batch_size / statistics.median(t) for name, t in times.items()}
    base_row = rows[0]
    print()
    print(f"{args.model} (random weights), batch {args.batch_size}, onnxruntime {ort.__version__} "
          f"CPUExecutionProvider, {args.threads} threads, {args.runs} interleaved rounds (median); "
          f"torch {torch.__version__}; {time.perf_counter() - start:.0f} s in all")
    head = f"{'setting':<22}{'GFLOPs':>8}{'FLOPs ratio':>13}{'ORT img/s':>11}{'throughput ratio':>18}"
    if args.torch:
        head += f"{'torch img/s':>13}{'torch ratio':>13}"
    print(head)
    print("-" * len(head))
    for row in rows:
        name = row["label"]
        line = (f"{name:<22}{row['gflops']:>8.3f}{row['gflops'] / base_row['gflops']:>13.3f}"
                f"{ips[name]:>11.1f}{ips[name] / ips['uncompressed']:>17.2f}x")
        if args.torch:
            t = ips[f"{name} [torch]"]
            line += f"{t:>13.1f}{t / ips['uncompressed [torch]']:>12.2f}x"
        print(line)
    for row in rows[1:]:
        print(f"  {row['label']}: tokens per block {row['tokens']}")
    return 0


def _no_grad(model, x):
    with torch.no_grad():
        return model(x)


if __name__ == "__main__":
    sys.exit(main())
