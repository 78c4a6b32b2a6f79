#!/usr/bin/env python3
"""Several ONNX files timed in onnxruntime in one interleaved run: median ms per batch and the
speedup over the first file. For comparing exports of one model across commits or options (e.g.
an int8 file before and after a change of ``quantize_onnx``), where separate benchmark runs differ
by more than the change: the machine's state moves every file's time alike within one run.

    python experiments/tools/time_ort.py DIR/deit_small_patch16_224-uncompressed-int8.onnx \\
        OLD/deit_small_patch16_224-tome-flops=0.65-int8.onnx DIR/deit_small_patch16_224-tome-flops=0.65-int8.onnx

Sessions as ``bench_onnx.py`` makes them (``vitcompress.export.ort_session``); random-normal
images of each file's input shape. Run it on an idle machine.
"""
import argparse
import os
import statistics
import time

import numpy as np
import torch

from vitcompress.export import ort_session


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="ONNX files; the first is the comparison point")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=9, help="timed interleaved rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    sessions = [ort_session(path) for path in args.files]
    feeds = []
    for session in sessions:
        spec = session.get_inputs()[0]
        shape = [args.batch_size] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
        feeds.append({spec.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    times = [[] for _ in sessions]
    for round_ in range(args.warmup + args.runs):
        for i, (session, feed) in enumerate(zip(sessions, feeds)):
            start = time.perf_counter()
            session.run(None, feed)
            if round_ >= args.warmup:
                times[i].append(time.perf_counter() - start)
    medians = [statistics.median(t) for t in times]
    print(f"onnxruntime, batch {args.batch_size}, {args.threads} threads, {args.runs} interleaved rounds; load average "
          f"before {load_before:.2f}, after {os.getloadavg()[0]:.2f} (valid only on an idle machine)")
    for path, median in zip(args.files, medians):
        print(f"{1000 * median:8.1f} ms  {medians[0] / median:5.2f}x  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
