"""Fused Triton kernels against their torch references, and compressed ViTs with kernels on vs off.

    python experiments/benchmarks/bench_kernels.py [--batch-size 64] [--runs 10] [--models deit_small_patch16_224 ...]

Part 1 times each primitive (bipartite_match, energy_score, topk_indices, rank_plan, pagerank_steps,
pagerank_scores, apply_plan) at the shapes a ViT produces -- the ToMe / PiToMe metric is the key
averaged over heads, so C = head_dim = 64; 196 or 576 patch tokens (224 / 384 px), a 4096-long row
for top-k; the apply path on DeiT-S / ViT-B hidden states (C = 384 / 768, 197 tokens, ToMe's r = 13
merges or a pruning plan) -- in float32 and float16 (``--dtypes``), with ``triton.testing.do_bench``
(median), after checking that both give the same answer. The torch reference of a fused primitive
is a chain of small ops (rank_plan, pagerank_scores and apply_plan replace 6, ~30 and ~9 of them).
Part 2 measures end-to-end images/s of timm models (random weights) compressed with ToMe, PiToMe
(and Zero-TPrune where registered), once with ``VITCOMPRESS_KERNELS=torch`` and once with
``=triton``, interleaved in one run, and prints the ratios.

Needs a CUDA device; without one it says so and exits 0.
"""
import argparse
import copy
import os
import sys

import torch

NO_CUDA = "no CUDA device: the GPU figures are still to be measured"

DEVICE = "cuda"
DEFAULT_MODELS = ["deit_small_patch16_224", "vit_base_patch16_224"]
DEFAULT_SETTINGS = ["tome:r=13", "pitome:keep=0.9", "zero_tprune:flops=0.653"]


class WithKernels(torch.nn.Module):
    """Runs ``model`` with ``VITCOMPRESS_KERNELS`` set to ``backend`` for the duration of a forward."""

    def __init__(self, model: torch.nn.Module, backend: str):
        super().__init__()
        self.model = model
        self.backend = backend

    def forward(self, x):
        before = os.environ.get("VITCOMPRESS_KERNELS")
        os.environ["VITCOMPRESS_KERNELS"] = self.backend
        try:
            return self.model(x)
        finally:
            if before is None:
                del os.environ["VITCOMPRESS_KERNELS"]
            else:
                os.environ["VITCOMPRESS_KERNELS"] = before


def _cases(batch: int):
    """(primitive, description, args builder) at ViT shapes; builders take (dtype, generator)."""
    def randn(g, *shape, dtype):
        return torch.randn(*shape, generator=g, device=DEVICE).to(dtype)

    cases = []
    for n in (196, 576):
        half = n // 2
        cases.append(("bipartite_match", f"a,b [{batch},{half},64]",
                      lambda g, dt, h=half: (randn(g, batch, h, 64, dtype=dt), randn(g, batch, h, 64, dtype=dt))))
    for n in (196, 576):
        cases.append(("energy_score", f"x [{batch},{n},64]",
                      lambda g, dt, n=n: (randn(g, batch, n, 64, dtype=dt), 0.75, 1.0)))
    for n in (196, 576, 4096):
        cases.append(("topk_indices", f"s [{batch},{n}] k={n}",
                      lambda g, dt, n=n: (randn(g, batch, n, dtype=dt), n)))
    graphs = batch * 6  # DeiT-S heads

    def attention(g, dt, n=197, alive=False):
        attn = randn(g, graphs, n, n, dtype=torch.float32).softmax(-1).to(dt)
        init = torch.full((graphs, n), 1.0 / n, device=DEVICE)
        mask = (torch.rand(graphs, n, generator=g, device=DEVICE) > 0.05).float() if alive else None
        return attn, init, 30, mask

    cases.append(("pagerank_steps", f"A [{graphs},197,197] x30", attention))
    cases.append(("pagerank_steps", f"A [{graphs},197,197] x30 alive", lambda g, dt: attention(g, dt, alive=True)))

    def scores(g, dt, alive=False):
        attn = randn(g, batch, 6, 197, 197, dtype=torch.float32).softmax(-1).to(dt)
        kept = torch.rand(batch, 196, generator=g, device=DEVICE).argsort(dim=1)[:, :183] if alive else None
        return attn, 30, 1, True, kept, 0.01, 0.7, True, "rms"

    cases.append(("pagerank_scores", f"A [{batch},6,197,197] x30", scores))
    cases.append(("pagerank_scores", f"A [{batch},6,197,197] x30 alive", lambda g, dt: scores(g, dt, alive=True)))

    def ranking(g, dt):
        score = randn(g, batch, 98, dtype=dt)
        match = torch.randint(0, 98, (batch, 98), generator=g, device=DEVICE)
        tokens = torch.arange(196, device=DEVICE).expand(batch, 196)
        return score, match, 13, tokens[:, 0::2], tokens[:, 1::2], True, False

    cases.append(("rank_plan", f"s [{batch},98] r=13", ranking))

    def plan(g, dt, C, merge):
        x = randn(g, batch, 197, C, dtype=dt)
        size = torch.randint(1, 4, (batch, 197, 1), generator=g, device=DEVICE).float()
        perm = torch.rand(batch, 196, generator=g, device=DEVICE).argsort(dim=1)
        if not merge:
            return x, size, perm[:, :183], None, None, 1, True
        dst = torch.randint(0, 183, (batch, 13), generator=g, device=DEVICE)
        return x, size, perm[:, :183], perm[:, 183:], dst, 1, True

    for C in (384, 768):
        cases.append(("apply_plan", f"x [{batch},197,{C}] merge 13", lambda g, dt, C=C: plan(g, dt, C, True)))
    cases.append(("apply_plan", f"x [{batch},197,384] prune 13", lambda g, dt: plan(g, dt, 384, False)))
    return cases


def _same(name, out, ref) -> str:
    if name == "bipartite_match":
        ok = torch.allclose(out[0], ref[0], atol=1e-5, rtol=0)
        agree = (out[1] == ref[1]).float().mean().item()  # near-ties may resolve either way
        return f"{'ok' if ok else 'SCORES DIFFER'} ({100 * agree:.2f}% same index)"
    if name in ("energy_score", "pagerank_steps", "pagerank_scores"):
        err = (out - ref).abs().max().item()
        return f"{'ok' if err < 1e-5 else 'DIFFERS'} (max err {err:.1e})"
    if name == "apply_plan":
        err = (out[0].float() - ref[0].float()).abs().max().item()
        tol = 1e-5 if out[0].dtype == torch.float32 else 2e-2
        same = torch.equal(out[1], ref[1])
        return f"{'ok' if err <= tol and same else 'DIFFERS'} (max err {err:.1e})"
    if name == "rank_plan":
        return "ok" if all(torch.equal(a, b) for a, b in zip(out, ref)) else "DIFFERS"
    return "ok" if torch.equal(out, ref) else "DIFFERS"


def bench_primitives(batch: int, dtypes=(torch.float32, torch.float16), only=None) -> None:
    import triton.testing

    from vitcompress.kernels import dispatch, reference

    fused = dispatch._load_triton()
    print("\n1. primitives, median of triton.testing.do_bench (ms)")
    print(f"{'primitive':<17}{'shape':<30}{'dtype':<10}{'torch':>10}{'triton':>10}{'speedup':>9}  check")
    for name, desc, build in _cases(batch):
        if only and name not in only:
            continue
        for dtype in dtypes:
            g = torch.Generator(device=DEVICE).manual_seed(0)
            args = build(g, dtype)
            ref_fn, tri_fn = getattr(reference, name), fused[name]
            check = _same(name, tri_fn(*args), ref_fn(*args))
            t_ref = triton.testing.do_bench(lambda: ref_fn(*args), warmup=25, rep=200, return_mode="median")
            t_tri = triton.testing.do_bench(lambda: tri_fn(*args), warmup=25, rep=200, return_mode="median")
            dt = str(dtype).replace("torch.", "")
            print(f"{name:<17}{desc:<30}{dt:<10}{t_ref:>10.4f}{t_tri:>10.4f}{t_ref / t_tri:>8.2f}x  {check}")


def bench_models(models, settings, batch: int, runs: int, dtype=torch.float32) -> None:
    import timm

    import vitcompress
    from vitcompress.cli.settings import describe, parse_setting

    print(f"\n2. end to end, images/s (batch {batch}, {str(dtype).replace('torch.', '')}, {runs} interleaved runs, "
          "random weights)")
    print(f"{'model':<24}{'setting':<26}{'uncompr.':>10}{'kernels off':>13}{'kernels on':>12}"
          f"{'on/off':>8}{'on/uncompr.':>13}{'max |diff|':>12}")
    for model_name in models:
        torch.manual_seed(0)
        base = timm.create_model(model_name, pretrained=False).eval().to(DEVICE, dtype)
        x = torch.randn(batch, 3, *base.patch_embed.img_size, device=DEVICE, dtype=dtype)
        for text in settings:
            method, kwargs = parse_setting(text)
            if method not in vitcompress.list_methods():
                continue
            compressed = vitcompress.compress(copy.deepcopy(base), method, **kwargs)
            off, on = WithKernels(compressed, "torch"), WithKernels(compressed, "triton")
            with torch.inference_mode():
                diff = (on(x) - off(x)).abs().max().item()  # also compiles the kernels before timing
            speed = vitcompress.compare_speed({"base": base, "off": off, "on": on}, x, warmup=3, runs=runs,
                                              latency=False, memory=False)
            tp = {k: v["throughput"] for k, v in speed.items()}
            print(f"{model_name:<24}{method + ' ' + describe(kwargs):<26}{tp['base']:>10.1f}{tp['off']:>13.1f}"
                  f"{tp['on']:>12.1f}{tp['on'] / tp['off']:>8.3f}{tp['on'] / tp['base']:>13.3f}{diff:>12.1e}")
            del compressed, off, on
        del base
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=64, help="batch for the primitives and the models")
    ap.add_argument("--runs", type=int, default=10, help="interleaved timed runs per model")
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--settings", nargs="*", default=DEFAULT_SETTINGS, help="method:budget, e.g. tome:r=13")
    ap.add_argument("--skip-models", action="store_true", help="only the primitives")
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float16"], help="dtypes of the primitives")
    ap.add_argument("--only", nargs="*", default=None, help="only these primitives")
    ap.add_argument("--model-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="dtype of part 2")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    from vitcompress.kernels import dispatch

    if not dispatch.triton_available():
        print(f"Triton kernels unavailable on this machine ({dispatch._load_error!r}): nothing to compare")
        return 1
    import triton

    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
    bench_primitives(args.batch_size, [getattr(torch, d) for d in args.dtypes], args.only)
    if not args.skip_models:
        bench_models(args.models, args.settings, args.batch_size, args.runs, getattr(torch, args.model_dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
