#!/usr/bin/env python3
"""What ATC's clustering costs per reducing block, next to ToMe's matching and the block itself.

    python experiments/studies/atc_cost.py                  # DeiT-S shapes, batch 16, CPU
    python experiments/studies/atc_cost.py --device cuda
    PYTHONPATH=$PWD:/tmp/atc_site python experiments/studies/atc_cost.py --sklearn   # + the official way

On DeiT-S shapes (196 reducible tokens, keys of 64 per head, 384 wide, 6 heads) it times, per block
and batch: ``atc.token_clustering`` (the batched greedy clustering, ``r`` sequential steps), ToMe's
``tome_matching`` at the same ``r``, and one DeiT-S block forward on 197 tokens. With ``--sklearn``
(scikit-learn importable) also the official code's way: scikit-learn's ``AgglomerativeClustering``
per image on the CPU. Times are medians of ``--runs``; the header prints device, dtype, batch,
threads and the load average (timings taken while others load the machine are not results).
"""
import argparse
import os
import platform
import statistics
import time

import torch

from vitcompress.methods.atc import cosine_distances, token_clustering
from vitcompress.methods.tome import tome_matching


def median_ms(fn, runs, device):
    times = []
    for _ in range(runs + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times[1:])  # the first run warms up


def sklearn_ms(metric, r, linkage, runs):
    from sklearn.cluster import AgglomerativeClustering
    d = cosine_distances(metric.cpu()).numpy()
    clustering = AgglomerativeClustering(n_clusters=metric.shape[1] - r, metric="precomputed", linkage=linkage)

    def run():
        for b in range(len(d)):
            clustering.fit(d[b])
    return median_ms(run, runs, "cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--r", type=int, nargs="+", default=[8, 19, 48, 98],
                    help="tokens removed in the block (on DeiT-S, flops=0.7 removes 11 to 6 per block, "
                         "flops=0.55 20 to 6; keep=0.9 19 in the first)")
    ap.add_argument("--linkage", default="average")
    ap.add_argument("--sklearn", action="store_true", help="also time scikit-learn per image (the official way)")
    args = ap.parse_args(argv)

    import timm
    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224").eval().to(args.device)
    T, B = 196, args.batch
    metric = torch.randn(B, T, 64, device=args.device)
    tokens = torch.randn(B, T + 1, 384, device=args.device)
    load = os.getloadavg()
    print(f"device {args.device} ({platform.processor() or platform.machine()}), float32, batch {B}, "
          f"{torch.get_num_threads()} threads, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"torch {torch.__version__}, median of {args.runs} runs")
    with torch.no_grad():
        block = median_ms(lambda: deit.blocks[0](tokens), args.runs, args.device)
        print(f"DeiT-S block forward, 197 tokens: {block:.1f} ms")
        print("| r | atc clustering ms | ms / step | x block | tome matching ms |"
              + (" sklearn per image ms |" if args.sklearn else ""))
        print("|---|---|---|---|---|" + ("---|" if args.sklearn else ""))
        for r in args.r:
            atc = median_ms(lambda: token_clustering(metric, r, args.linkage), args.runs, args.device)
            tome = median_ms(lambda: tome_matching(metric, min(r, T // 2), 1, True), args.runs, args.device)
            row = f"| {r} | {atc:.1f} | {atc / r:.2f} | {atc / block:.2f} | {tome:.2f} |"
            if args.sklearn:
                row += f" {sklearn_ms(metric, r, args.linkage, args.runs):.1f} |"
            print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
