#!/usr/bin/env python3
"""Several exported files timed in one interleaved run -- ONNX files in onnxruntime, ``.pte``
files in ExecuTorch: median ms per batch and the speedup over the first file. For comparing
exports of one model across commits or options (e.g. an int8 file before and after a change of
``quantize_onnx``), where separate benchmark runs differ by more than the change: the machine's
state moves every file's time alike within one run.

    python experiments/tools/time_files.py DIR/deit_small_patch16_224-uncompressed-int8.onnx \\
        OLD/deit_small_patch16_224-tome-flops=0.65-int8.onnx DIR/deit_small_patch16_224-tome-flops=0.65-int8.onnx

Sessions as ``bench_onnx.py`` makes them (``vitcompress.export.ort_session``, ExecuTorch's
``Runtime``); random-normal images of the input shape (ONNX: the file's; ``.pte``: ``--image-size``).
Run it on an idle machine.
"""
import argparse
import os
import statistics
import time

import numpy as np
import torch

from vitcompress.export import ort_session


def _runner(path: str, batch_size: int, image_size: int):
    """A callable running one batch of random-normal images through the file at ``path``."""
    if path.endswith(".pte"):
        from executorch.runtime import Runtime

        forward = Runtime.get().load_program(path).load_method("forward")
        x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        return lambda: forward.execute([x])
    session = ort_session(path)
    spec = session.get_inputs()[0]
    shape = [batch_size] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
    feed = {spec.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    return lambda: session.run(None, feed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help=".onnx or .pte files; the first is the comparison point")
    ap.add_argument("--image-size", type=int, default=224, help="of the .pte files' inputs (3 channels)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=9, help="timed interleaved rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    runners = [_runner(path, args.batch_size, args.image_size) for path in args.files]
    times = [[] for _ in runners]
    for round_ in range(args.warmup + args.runs):
        for i, run in enumerate(runners):
            start = time.perf_counter()
            run()
            if round_ >= args.warmup:
                times[i].append(time.perf_counter() - start)
    medians = [statistics.median(t) for t in times]
    print(f"onnxruntime / ExecuTorch, batch {args.batch_size}, {args.threads} threads, {args.runs} interleaved rounds; "
          f"load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f} (valid only on an idle machine)")
    for path, median in zip(args.files, medians):
        print(f"{1000 * median:8.1f} ms  {medians[0] / median:5.2f}x  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
