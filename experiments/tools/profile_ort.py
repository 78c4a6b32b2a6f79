#!/usr/bin/env python3
"""Where an ONNX file's time goes in onnxruntime: its profiler's kernel time per op type, for
several files side by side (e.g. the uncompressed and a compressed int8 file of bench_onnx.py).

    python experiments/tools/profile_ort.py DIR/deit_small_patch16_224-uncompressed-int8.onnx \\
        DIR/deit_small_patch16_224-tome-flops=0.65-int8.onnx --batch-size 16

Prints, per file, the summed kernel milliseconds per run of each op type (the graph onnxruntime
runs after its own fusions: an int8 linear layer is MatMulIntegerToFloat, a float one MatMul) and
the linear layers left in float (a MatMul with a constant weight). Kernel times add up the work,
not the wall clock; run it on an idle machine.
"""
import argparse
import collections
import json
import os
import tempfile

import numpy as np


def profile(path: str, batch_size: int, runs: int, threads: int):
    """``(ms per run by op type, [(ms, node, input shapes)] of the float MatMuls with a constant weight)``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="profile_ort_"), "run")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
        (batch_size, 3, 224, 224)).astype(np.float32)}
    for _ in range(runs + 1):
        session.run(None, feed)
    with open(session.end_profiling()) as f:
        events = [e for e in json.load(f) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    events = events[len(events) // (runs + 1):]  # the first run is a warm-up
    by_op, float_linear = collections.Counter(), collections.Counter()
    shapes = {}
    for e in events:
        op = e["args"]["op_name"]
        by_op[op] += e["dur"] / 1000 / runs
        inputs = e["args"].get("input_type_shape", [])
        if op == "MatMul" and len(inputs) == 1:  # the weight is a constant: not listed among the inputs
            node = e["name"][:-len("_kernel_time")]
            float_linear[node] += e["dur"] / 1000 / runs
            shapes[node] = inputs
    return by_op, [(ms, name, shapes[name]) for name, ms in float_linear.most_common()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="ONNX files (input [B, 3, 224, 224])")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=16, help="op types shown (by the first file's time)")
    args = ap.parse_args(argv)
    results = [profile(f, args.batch_size, args.runs, args.threads) for f in args.files]
    print(f"onnxruntime kernel ms per run, batch {args.batch_size}, {args.threads} threads, {args.runs} runs; "
          f"load average {os.getloadavg()[0]:.2f}")
    for i, f in enumerate(args.files):
        print(f"  [{i}] {f}")
    ops = collections.Counter()
    for by_op, _ in results:
        ops.update(by_op)
    print(f"{'op type':28s}" + "".join(f"{f'[{i}]':>10s}" for i in range(len(args.files))))
    for op, _ in ops.most_common(args.top):
        print(f"{op:28s}" + "".join(f"{by_op.get(op, 0.0):10.1f}" for by_op, _ in results))
    print(f"{'total':28s}" + "".join(f"{sum(by_op.values()):10.1f}" for by_op, _ in results))
    for i, (_, float_linear) in enumerate(results):
        total = sum(ms for ms, _, _ in float_linear)
        print(f"[{i}] float linear layers: {len(float_linear)}, {total:.1f} ms; the largest:")
        for ms, name, shapes in float_linear[:6]:
            print(f"      {ms:6.1f} ms  {name}  {shapes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
