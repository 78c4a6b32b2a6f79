"""Kernel launches per block of a compressed ViT, per method (issue 13's count).

    python experiments/benchmarks/count_launches.py                           # tiny ViT, CPU, Triton forced (interpreted)
    python experiments/benchmarks/count_launches.py --model deit_small_patch16_224
    python experiments/benchmarks/count_launches.py --device cuda --model vit_base_patch16_224 --dtype float16

Every aten op that launches a kernel counts one (views, and allocations that launch nothing, are
left out), seen through a ``TorchDispatchMode``; every Triton kernel launch counts one, seen by
wrapping Triton's launch (``JITFunction.run``, and ``InterpretedFunction.run`` under
``TRITON_INTERPRET=1``), with the aten ops Triton's interpreter runs to move arguments left out.
A vitcompress custom op (``torch.ops.vitcompress.*``) counts what it launches inside. Ops are
attributed to the block whose forward is running (forward hooks); the rest is "other".

On a CPU the Triton kernels run only under Triton's interpreter: this script sets
``TRITON_INTERPRET=1`` (before torch and Triton are imported) unless ``--kernels torch``, and forces
``VITCOMPRESS_KERNELS`` to ``--kernels`` (default ``triton``). Printed per method: the launches of
an uncompressed block, of a reducing block (mean and most over the reducing blocks), the aim
(tome / pitome at most 18, zero_tprune at most 35, ppt 40, atc 240: r clustering steps) and the host-device syncs seen in the forward
(``aten._local_scalar_dense``, ``nonzero`` and the like, ``Tensor.item`` / ``tolist`` / ``bool``).
"""
import argparse
import contextlib
import os
import sys
from collections import Counter

# evit / mctf: what they measured (41 / 95 on the 4-block tiny ViT, Triton forced) plus a margin -- their weighted
# merges run the torch reference, and MCTF's criteria and bidirectional matching are many small ops;
# ppt: both plans (pruning and ToMe pooling) and the per-image choice; atc: r sequential clustering
# steps of about 14 launches each (keep=0.9 on the tiny ViT: up to 7 steps)
AIMS = {"tome": 18, "pitome": 18, "zero_tprune": 35, "evit": 45, "mctf": 100, "tofu": 32, "ppt": 40, "atc": 240,
        "random": 18}
DEFAULT_SETTINGS = ["tome:r=4", "pitome:keep=0.9", "zero_tprune:keep=0.9"]
DEEP_SETTINGS = ["tome:r=13", "pitome:keep=0.9", "zero_tprune:flops=0.653"]

#: aten ops that launch no kernel (allocation, metadata, aliasing); views are recognised by their schema
NO_LAUNCH = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::_unsafe_view", "aten::detach", "aten::alias", "aten::lift_fresh", "aten::sym_size", "aten::sym_stride",
    "aten::sym_numel", "aten::sym_storage_offset", "aten::resize_", "aten::set_", "aten::is_same_size",
    "aten::_reshape_alias", "aten::result_type", "aten::_has_compatible_shallow_copy_type",
}
#: aten ops that wait for the device (or whose output shape depends on tensor values)
SYNC_OPS = {
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::nonzero_static",
    "aten::masked_select", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::unique_dim_consecutive", "aten::equal", "aten::allclose", "aten::_assert_async",
    "aten::repeat_interleave", "aten::masked_scatter", "aten::argwhere", "aten::bincount", "aten::histc",
}
#: Tensor methods that read tensor values on the host
SYNC_METHODS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__"}


def _is_view(func) -> bool:
    return bool(getattr(func, "is_view", False))


def _name(func) -> str:
    return func._schema.name if hasattr(func, "_schema") else str(func)


class _Launches:
    """Triton launches, counted by wrapping Triton's launch entry points; while a launch runs the
    aten ops it does (the interpreter's argument copies) are not the program's."""

    depth = 0
    listeners = []

    @classmethod
    @contextlib.contextmanager
    def watching(cls, listener):
        cls.listeners.append(listener)
        undo = cls._patch() if len(cls.listeners) == 1 else None
        try:
            yield
        finally:
            cls.listeners.remove(listener)
            if undo is not None:
                undo()

    @classmethod
    def _patch(cls):
        classes = []
        try:
            from triton.runtime.jit import JITFunction
            classes.append(JITFunction)
        except Exception:  # no triton: nothing to count
            return lambda: None
        try:
            from triton.runtime.interpreter import InterpretedFunction
            classes.append(InterpretedFunction)
        except Exception:
            pass
        saved = []
        for klass in classes:
            original = klass.__dict__.get("run")
            if original is None:
                continue

            def run(self, *args, __original=original, **kwargs):
                if kwargs.get("warmup", False):
                    return __original(self, *args, **kwargs)
                for listener in list(cls.listeners):
                    listener.triton_launch(getattr(self, "__name__", "triton"))
                cls.depth += 1
                try:
                    return __original(self, *args, **kwargs)
                finally:
                    cls.depth -= 1

            saved.append((klass, original))
            klass.run = run

        def undo():
            for klass, original in saved:
                klass.run = original
        return undo


def _modes():
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class LaunchCounter(TorchDispatchMode):
        """Counts launches (aten ops that launch a kernel, Triton launches) and syncs, per region."""

        def __init__(self):
            super().__init__()
            self.region = "other"
            self.launches = Counter()  # region -> launches
            self.ops = {}  # region -> Counter of op names
            self.syncs = []  # (region, what)

        def _add(self, name):
            self.launches[self.region] += 1
            self.ops.setdefault(self.region, Counter())[name] += 1

        def triton_launch(self, name):
            if _Launches.depth == 0:
                self._add(f"triton:{name}")

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if _Launches.depth > 0:  # the interpreter moving a kernel's arguments
                return func(*args, **kwargs)
            name = _name(func)
            if name.startswith("vitcompress::"):
                from vitcompress.kernels import ops
                inside = ops.implementation(name)
                if inside is not None:
                    with self:  # count what the custom op runs inside
                        return inside(*args, **kwargs)
                return func(*args, **kwargs)  # its Triton launches are counted all the same
            if name in SYNC_OPS:
                self.syncs.append((self.region, name))
            if not _is_view(func) and name not in NO_LAUNCH:
                self._add(name)
            return func(*args, **kwargs)

    class HostReads(TorchFunctionMode):
        """Records the Tensor methods that read values on the host (``item``, ``tolist``, ``bool``...)."""

        def __init__(self, counter):
            super().__init__()
            self.counter = counter

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in SYNC_METHODS and _Launches.depth == 0:
                self.counter.syncs.append((self.counter.region, f"Tensor.{name}"))
            return func(*args, **(kwargs or {}))

    return torch, LaunchCounter, HostReads


@contextlib.contextmanager
def counting(model=None):
    """``with counting(model) as c: model(x)``: ``c.launches`` per region ("block i", "other"),
    ``c.ops`` the op names, ``c.syncs`` the host-device syncs seen."""
    torch, LaunchCounter, HostReads = _modes()
    counter = LaunchCounter()
    handles = []
    if model is not None:
        for i, block in enumerate(_blocks(model)):
            def pre(module, inputs, i=i):
                counter.region = f"block {i}"

            def post(module, inputs, output):
                counter.region = "other"
            handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        with _Launches.watching(counter), HostReads(counter), counter:
            yield counter
    finally:
        for h in handles:
            h.remove()


def _blocks(model):
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("count_launches: the model has no .blocks (a timm VisionTransformer is expected)")
    return list(blocks)


def make_model(name: str):
    if name == "tiny":
        from vitcompress.testing import tiny_vit
        return tiny_vit()
    import timm
    return timm.create_model(name).eval()


def per_block(model, x):
    """Launches of each block and of everything else, and the syncs, in one forward."""
    import torch
    with torch.no_grad(), counting(model) as c:
        model(x)
    depth = len(_blocks(model))
    return [c.launches.get(f"block {i}", 0) for i in range(depth)], c


def measure(model_name: str, settings, device="cpu", dtype="float32", batch_size=2):
    """Rows ``{method, setting, plain, reducing (list), mean, max, aim, syncs, ops}`` for ``settings``."""
    import torch
    import vitcompress
    from vitcompress.cli.settings import parse_setting
    dt = getattr(torch, dtype)
    model = make_model(model_name).to(device, dt)
    size = model.patch_embed.img_size
    x = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(0)).to(device, dt)
    plain, _ = per_block(model, x)
    plain = sorted(plain)[len(plain) // 2]  # the median block
    rows = []
    for text in settings:
        method, budget = parse_setting(text)  # method:budget[,option=value...]
        vitcompress.compress(model, method, **budget)
        counts, c = per_block(model, x)
        reducing = [n for i, n in enumerate(counts) if _reduces(model, i)]
        rows.append(dict(method=method, setting=text, plain=plain, reducing=reducing, per_block=counts,
                         mean=sum(reducing) / max(len(reducing), 1), max=max(reducing, default=0),
                         aim=AIMS.get(method), syncs=list(c.syncs), ops=c.ops))
        vitcompress.restore(model)
    return rows


def _reduces(model, layer: int) -> bool:
    from vitcompress.interfaces import runtime_of
    runtime = runtime_of(model)
    return runtime.schedule.remove[layer] > 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="*", help=f"method:budget[,option=value...] (default "
                                                f"{' '.join(DEFAULT_SETTINGS)} on the tiny model, "
                                                f"{' '.join(DEEP_SETTINGS)} otherwise)")
    ap.add_argument("--model", default="tiny", help="'tiny' (64 patches, 4 blocks) or a timm model name")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--kernels", default="triton", choices=["triton", "torch", "auto"],
                    help="VITCOMPRESS_KERNELS for the run (default triton; on a CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--ops", action="store_true", help="also list the ops of the first reducing block")
    args = ap.parse_args(argv)
    if args.kernels != "auto":
        os.environ["VITCOMPRESS_KERNELS"] = args.kernels
    if args.device == "cpu" and args.kernels == "triton":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("count_launches: Triton was imported before TRITON_INTERPRET=1 could be set", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    settings = args.settings or (DEFAULT_SETTINGS if args.model == "tiny" else DEEP_SETTINGS)
    rows = measure(args.model, settings, args.device, args.dtype, args.batch_size)
    import torch
    print(f"launches per block: {args.model}, batch {args.batch_size}, {args.dtype}, {args.device}, "
          f"VITCOMPRESS_KERNELS={os.environ.get('VITCOMPRESS_KERNELS', 'auto')}"
          + (", TRITON_INTERPRET=1" if os.environ.get("TRITON_INTERPRET") == "1" else "") + f", torch {torch.__version__}")
    w = max(26, *(len(r["setting"]) for r in rows))
    print(f"{'setting':{w}s} {'plain block':>11s} {'reducing: mean':>14s} {'max':>5s} {'aim':>5s}  {'syncs':>5s}  "
          "per block")
    failed = False
    for r in rows:
        ok = r["aim"] is None or r["max"] <= r["aim"]
        failed |= not ok or bool(r["syncs"])
        print(f"{r['setting']:{w}s} {r['plain']:11d} {r['mean']:14.1f} {r['max']:5d} {str(r['aim'] or '-'):>5s}  "
              f"{len(r['syncs']):5d}  {r['per_block']}" + ("" if ok else "  ABOVE AIM"))
        if args.ops:
            first = next(i for i, n in enumerate(r["per_block"]) if n in r["reducing"])
            ops = r["ops"].get(f"block {first}", {})
            print("    " + ", ".join(f"{k.replace('aten::', '')} x{v}" if v > 1 else k.replace("aten::", "")
                                     for k, v in sorted(ops.items(), key=lambda kv: -kv[1])))
        for region, what in r["syncs"][:5]:
            print(f"    sync in {region}: {what}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
