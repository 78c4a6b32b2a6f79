#!/usr/bin/env python3
"""Where an ExecuTorch program's time goes: its ETDump profile, per file side by side -- the
forward, the calls delegated to XNNPACK, the ops left to ExecuTorch's portable kernels
(``ExecuTorchReport.portable_ops``) and the slowest of those by name. For the question whether
the ops outside XNNPACK still cost what they did (issue 31: ~35% of a compressed forward once).

    python experiments/tools/profile_executorch.py DIR/deit_small_patch16_224-uncompressed.pte \\
        DIR/deit_small_patch16_224-tome-flops=0.65.pte --batch-size 16

Milliseconds per forward, the mean of ``--runs`` forwards after one warm-up. Profiling adds a
little time to each op (most to the many small portable ones); run it on an idle machine.
"""
import argparse
import collections
import os
import tempfile
import warnings

import torch


def profile(path: str, batch_size: int, runs: int):
    """``(ms per forward by event name, calls per forward by event name)`` from an ETDump."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    module = portable_lib._load_for_executorch(path, enable_etdump=True)
    shape = [batch_size] + list(module.method_meta("forward").input_tensor_meta(0).sizes()[1:])
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    for _ in range(runs + 1):
        module.forward([x])
    dump = os.path.join(tempfile.mkdtemp(prefix="profile_executorch_"), "run.etdp")
    module.write_etdump_result_to_file(dump)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no debug buffer: no tensor data, which is not needed here
        inspector = Inspector(etdump_path=dump)
    block = next(b for b in inspector.event_blocks if b.name == "Execute")
    ms, calls = collections.Counter(), collections.Counter()
    for event in block.events:
        if event.perf_data is not None:
            timed = event.perf_data.raw[1:]  # the first forward is a warm-up
            ms[event.name] += sum(timed) / len(timed)
            calls[event.name] += 1
    return ms, calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help=".pte files")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--top", type=int, default=10, help="portable ops listed by name")
    args = ap.parse_args(argv)

    load = os.getloadavg()[0]
    print(f"ExecuTorch ETDump, ms per forward, batch {args.batch_size}, mean of {args.runs} forwards; load average "
          f"{load:.2f}")
    for i, path in enumerate(args.files):
        ms, calls = profile(path, args.batch_size, args.runs)
        total, delegated, portable = ms["Method::execute"], ms["DELEGATE_CALL"], ms["OPERATOR_CALL"]
        print(f"  [{i}] {path}")
        print(f"      forward {total:.1f} ms: XNNPACK {delegated:.1f} ms ({calls['DELEGATE_CALL']} calls), "
              f"portable ops {portable:.2f} ms ({calls['OPERATOR_CALL']} calls, {100 * portable / total:.1f}%)")
        ops = [(v, name) for name, v in ms.items() if name.startswith("native_call_")]
        for v, name in sorted(ops, reverse=True)[:args.top]:
            print(f"        {v:7.3f} ms  {calls[name]:4d}  {name[len('native_call_'):]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
