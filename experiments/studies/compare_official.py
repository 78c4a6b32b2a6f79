#!/usr/bin/env python3
r"""vitcompress next to the official ToMe and PiToMe code: same model, same inputs.

    python experiments/studies/compare_official.py --official-dir /work/official
    python experiments/studies/compare_official.py --official-dir /work/official --no-realvit --json out.json
    python experiments/studies/compare_official.py --official-dir /work/official --realvit-images 128
    python experiments/studies/compare_official.py --official-dir /work/official --noise-floor   # + official f32 vs f64

The official code is NOT part of this repository (both repositories are CC BY-NC 4.0) and nothing of
it is copied here: fetch it yourself and point ``--official-dir`` (or ``$VITCOMPRESS_OFFICIAL_DIR``)
at a folder holding::

    ToMe/tome/{merge,utils}.py, ToMe/tome/patch/timm.py         github.com/facebookresearch/ToMe
    PiToMe/algo/pitome/merge.py, PiToMe/algo/pitome/patch/{timm,deit}.py   github.com/hchautran/PiToMe

e.g. ``git clone https://github.com/facebookresearch/ToMe <dir>/ToMe`` and
``git clone https://github.com/hchautran/PiToMe <dir>/PiToMe`` (a ``COMMIT`` file or the clone's
``.git`` tells the script which commit it ran). Only those modules are loaded, by path, at run time;
the packages' ``__init__`` files are skipped (PiToMe's imports transformers/LAVIS model code that does
not import with current transformers).

The shim for timm 1.x (applied at run time, to the patched model instance only):

* ToMe (``tome.patch.timm.apply_patch``, proportional attention on, as for supervised models): runs
  unchanged on timm 1.0.
* PiToMe (``algo.pitome.patch.deit.apply_patch``, its timm ViT path; its ``PiToMeBlock`` and
  ``PiToMeAttention`` live in ``patch/timm.py``; it uses no proportional attention): written for
  timm 0.4.12. timm 1.x's ``VisionTransformer.forward`` passes ``attn_mask=``/``is_causal=`` to
  ``forward_features`` (dropped; refused if set), the official ``forward_features`` reads
  ``self.dist_token`` (set to ``None``, timm 0.4's value for a model without one) and
  ``self.pre_logits`` (identity, timm 0.4's value without ``representation_size``) and returns the
  pooled class token, which timm 1.x's ``forward_head`` would pool again (replaced by
  ``fc_norm -> head_drop -> head`` on the pooled vector, i.e. timm 0.4's ``head(x)``; ``fc_norm``
  is the identity for token pooling). Its ``forward_features`` skips timm 1.x's ``patch_drop`` and
  ``norm_pre`` and adds the whole ``pos_embed``: the shim refuses models where that would matter.
  ``model(x)`` returns ``(output, flops)``; the output is taken.
* ``--layerscale-shim`` rows only: both official block forwards never call ``ls1``/``ls2`` (timm
  0.4's ``Block`` had no LayerScale). To compare the *merging* on a LayerScale model, those rows
  route the residual branches through ``ls1``/``ls2`` (the official ``_drop_path1``/``_drop_path2``
  hooks of the block, overridden on a subclass). The LayerScale rows at r=0 use the official code
  as is and show what it computes on such a model.

Budgets: ToMe ``r`` is the same on both sides (``prop_attn=True`` on both); PiToMe's ``ratio`` is
vitcompress's ``keep`` (``prop_attn=False`` here, as the official timm path has none). A third
PiToMe row gives vitcompress the per-block token counts the official run used (``r=[...]`` read
off the official run), separating the count rule from the merging.

Models and inputs:

(a) the embedded reference model (``vitcompress.evaluation.reference_model.load()``: a timm ViT, 6 blocks,
    65 tokens, no LayerScale; its 3000 shipped Fashion-MNIST test images). Outputs are the logits;
    predictions their argmax.
(b) the real DINOv2-style ViT-S/14 of ``vitcompress.evaluation.realvit`` (LayerScale, 257 tokens; skipped
    when it is not built/cached) on the reference images resized to 224 px (bilinear), replicated to
    3 channels and ImageNet-normalised (realvit's documented input). Outputs are the final-norm CLS
    embeddings; "predictions" are nearest class-centroid labels (cosine) with centroids taken from
    the uncompressed embeddings of the same images, so agreement says whether the two compressed
    embeddings land on the same class.

Columns: ``max abs`` and ``rel`` (Frobenius norm of the difference / norm of the official output)
between the official and the vitcompress outputs, ``agree`` the fraction of identical top-1
predictions, ``same`` the fraction of inputs whose outputs agree to 1e-4 of the output scale
(the same merges), the top-1 accuracy of each against the labels, and the tokens entering each
block (then the tokens after the last block) for both. ``--noise-floor`` adds, for each official
configuration, the same numbers for the official code in float32 against itself in float64: where
two tokens' scores are closer than float32 resolution, float rounding alone decides which merges,
and an input whose ranking has such a near-tie can differ between any two implementations. It
also runs vitcompress in float64 against the official float64 output (vitcompress's PiToMe ranks
the energies in float32 even then, so near-ties at float32 resolution stay there).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import os
import subprocess
import sys
import time
import types
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitcompress
from vitcompress.evaluation import realvit, reference_model
from vitcompress.evaluation.offline_data import to_input

ENV_VAR = "VITCOMPRESS_OFFICIAL_DIR"
TOME_FILES = ("tome/merge.py", "tome/utils.py", "tome/patch/timm.py")
PITOME_FILES = ("algo/pitome/merge.py", "algo/pitome/patch/timm.py", "algo/pitome/patch/deit.py")
REPOS = {"ToMe": "facebookresearch/ToMe", "PiToMe": "hchautran/PiToMe"}

# --------------------------------------------------------------------------- loading the official code


def official_dir(path: Optional[str] = None) -> str:
    """The folder holding ``ToMe/`` and ``PiToMe/`` (``path`` or ``$VITCOMPRESS_OFFICIAL_DIR``);
    raises FileNotFoundError naming what is missing."""
    path = path or os.environ.get(ENV_VAR)
    if not path:
        raise FileNotFoundError(f"no official code: pass --official-dir or set ${ENV_VAR}")
    missing = [os.path.join(path, sub, f) for sub, files in (("ToMe", TOME_FILES), ("PiToMe", PITOME_FILES))
               for f in files if not os.path.isfile(os.path.join(path, sub, f))]
    if missing:
        raise FileNotFoundError("official code incomplete, missing: " + ", ".join(missing))
    return path


def commit_of(repo_dir: str) -> str:
    """The commit of an official checkout: its ``COMMIT`` file, else ``git rev-parse HEAD``."""
    stamp = os.path.join(repo_dir, "COMMIT")
    if os.path.isfile(stamp):
        with open(stamp) as f:
            return f.read().strip()
    try:
        return subprocess.run(["git", "-C", repo_dir, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _package_stub(name: str, folder: str) -> None:
    """Register ``name`` as a package at ``folder`` without running its ``__init__``."""
    existing = sys.modules.get(name)
    if existing is not None:
        if list(getattr(existing, "__path__", [])) != [folder]:
            raise ImportError(f"a different module {name!r} is already imported ({existing!r})")
        return
    mod = types.ModuleType(name)
    mod.__path__ = [folder]
    mod.__package__ = name
    sys.modules[name] = mod


def load_official(path: Optional[str] = None) -> types.SimpleNamespace:
    """Import the official modules by path: ``tome_timm`` (ToMe's ``tome.patch.timm``),
    ``pitome_deit`` (PiToMe's ``algo.pitome.patch.deit``) and ``pitome_timm``, plus their commits."""
    root = official_dir(path)
    tome_root, pitome_root = os.path.join(root, "ToMe"), os.path.join(root, "PiToMe")
    _package_stub("tome", os.path.join(tome_root, "tome"))
    _package_stub("tome.patch", os.path.join(tome_root, "tome", "patch"))
    _package_stub("algo", os.path.join(pitome_root, "algo"))
    _package_stub("algo.pitome", os.path.join(pitome_root, "algo", "pitome"))
    _package_stub("algo.pitome.patch", os.path.join(pitome_root, "algo", "pitome", "patch"))
    return types.SimpleNamespace(
        root=root,
        tome_timm=importlib.import_module("tome.patch.timm"),
        pitome_deit=importlib.import_module("algo.pitome.patch.deit"),
        pitome_timm=importlib.import_module("algo.pitome.patch.timm"),
        commits={"ToMe": commit_of(tome_root), "PiToMe": commit_of(pitome_root)},
    )


# --------------------------------------------------------------------------- the timm 1.x shim


def _with_layerscale(block: nn.Module) -> None:
    """Route an official block's residual branches through ``ls1``/``ls2`` (timm 1.x LayerScale),
    by overriding the block's own drop-path hooks on a subclass."""
    base = type(block)

    class WithLayerScale(base):
        def _drop_path1(self, x):
            return base._drop_path1(self, self.ls1(x))

        def _drop_path2(self, x):
            return base._drop_path2(self, self.ls2(x))

    WithLayerScale.__name__ = base.__name__ + "WithLayerScale"
    block.__class__ = WithLayerScale


def official_tome(model: nn.Module, off: types.SimpleNamespace, r, prop_attn: bool = True,
                  layerscale: bool = False) -> nn.Module:
    """Patch ``model`` in place with the official ToMe timm patch and set ``model.r``."""
    off.tome_timm.apply_patch(model, trace_source=False, prop_attn=prop_attn)
    model.r = r
    if layerscale:
        for blk in model.blocks:
            _with_layerscale(blk)
    return model


def official_pitome(model: nn.Module, off: types.SimpleNamespace, ratio: float,
                    layerscale: bool = False) -> nn.Module:
    """Patch ``model`` in place with the official PiToMe timm (DeiT) patch, set ``model.ratio``
    and apply the timm 1.x shim described in the module docstring."""
    if getattr(model, "num_reg_tokens", 0) or getattr(model, "no_embed_class", False):
        raise ValueError("the official PiToMe forward_features knows neither register tokens nor no_embed_class")
    for name in ("patch_drop", "norm_pre"):
        if not isinstance(getattr(model, name, nn.Identity()), nn.Identity):
            raise ValueError(f"the official PiToMe forward_features skips timm 1.x's {name}, which this model uses")
    if getattr(model, "attn_pool", None) is not None or model.global_pool != "token":
        raise ValueError("the official PiToMe forward_features pools the class token; this model pools otherwise")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "using pitome"
        off.pitome_deit.apply_patch(model)
    model.ratio = ratio
    cls = type(model)
    # timm 1.x passes attn_mask/is_causal to forward_features; the official one takes x only.
    def forward_features(x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise ValueError("the official PiToMe path has no attention mask")
        return cls.forward_features(model, x)

    # timm 1.x's forward_head pools; the official forward_features already returns the pooled token.
    def forward_head(x, pre_logits=False):
        x = model.head_drop(model.fc_norm(x))
        return x if pre_logits else model.head(x)

    model.forward_features = forward_features
    model.forward_head = forward_head
    model.dist_token = None  # timm 0.4.12's value for a model without a distillation token
    model.pre_logits = nn.Identity()  # timm 0.4.12's value without representation_size
    if layerscale:
        for blk in model.blocks:
            _with_layerscale(blk)
    return model


# --------------------------------------------------------------------------- running and measuring


class TokenCounter:
    """Tokens entering each block and the final norm (= tokens after the last block)."""

    def __init__(self, model: nn.Module):
        self.counts: List[int] = []
        mods = list(model.blocks) + [model.norm]
        self.handles = [m.register_forward_pre_hook(self._hook) for m in mods]
        self.n = len(mods)

    def _hook(self, module, args):
        if len(self.counts) < self.n:
            self.counts.append(int(args[0].shape[1]))

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor, batch: int) -> (torch.Tensor, List[int]):
    """Outputs on ``x`` (in batches) and the tokens per block of the first batch."""
    counter = TokenCounter(model)
    outs = []
    try:
        for i in range(0, len(x), batch):
            out = model(x[i:i + batch])
            if isinstance(out, tuple):  # the official PiToMe forward returns (output, flops)
                out = out[0]
            outs.append(out.float())
    finally:
        counter.close()
    return torch.cat(outs), counter.counts


def compare(a: torch.Tensor, b: torch.Tensor, pred) -> Dict[str, float]:
    """max abs, relative (to ``a``) difference, top-1 agreement of two outputs [N, C], and the
    fraction of inputs whose outputs agree to 1e-4 of the output scale (``same``)."""
    a, b = a.float(), b.float()
    per_input = (a - b).abs().amax(-1)
    return {"max_abs": float(per_input.max()), "rel": float((a - b).norm() / a.norm()),
            "agree": float((pred(a) == pred(b)).float().mean()),
            "same": float((per_input <= 1e-4 * a.abs().max()).float().mean())}


def official_schedule(tokens: Sequence[int]) -> List[int]:
    """Tokens removed per block, read off a run's tokens per block (last entry: after the last block)."""
    return [int(t0 - t1) for t0, t1 in zip(tokens[:-1], tokens[1:])]


def load_realvit_or_none():
    try:
        return realvit.load_realvit(), None
    except Exception as e:  # noqa: BLE001
        return None, f"load_realvit() failed ({type(e).__name__}: {e})"


def centroid_predictor(emb: torch.Tensor, labels: torch.Tensor):
    """Nearest class-centroid (cosine) classifier, centroids from ``emb`` of the classes present."""
    e = F.normalize(emb.float(), dim=-1)
    classes = labels.unique()
    cent = F.normalize(torch.stack([e[labels == c].mean(0) for c in classes]), dim=-1)
    return lambda out: classes[(F.normalize(out.float(), dim=-1) @ cent.T).argmax(-1)]


def compare_model(name: str, base: nn.Module, x: torch.Tensor, labels: torch.Tensor, off, *,
                  tome_r: Sequence[int], pitome_ratio: Sequence[float], batch: int,
                  layerscale: bool, pred=None, noise_floor: bool = False, log=print) -> List[Dict]:
    """All rows for one model: ToMe, PiToMe (keep=ratio and official counts), and the r=0 rows.

    ``noise_floor``: also run each official configuration in float64 and report how far the
    official float32 output is from it (``floor_rel``, ``floor_agree``, ``floor_same``): what float
    rounding alone does to the official result (near-ties in the token ranking flip)."""
    rows = []
    t0 = time.time()
    ref_out, ref_tokens = run(base, x, batch)
    if pred is None:
        pred = lambda out: out.argmax(-1)  # noqa: E731
    acc = lambda out: float((pred(out) == labels).float().mean())  # noqa: E731
    log(f"[{name}] uncompressed: top-1 {acc(ref_out):.4f}, tokens {ref_tokens} ({time.time() - t0:.1f}s)")

    def row(method, setting, a_out, a_tokens, b_out, b_tokens, a_call, b_call):
        """One comparison: ``a`` (the official output, or the uncompressed one) against ``b``."""
        r = {"model": name, "method": method, "setting": setting, "a": a_call, "b": b_call,
             **compare(a_out, b_out, pred), "acc_a": acc(a_out), "acc_b": acc(b_out),
             "tokens_a": a_tokens, "tokens_b": b_tokens}
        rows.append(r)
        log(f"[{name}] {method} {setting}: max abs {r['max_abs']:.2e}, rel {r['rel']:.2e}, agree {r['agree']:.4f}, "
            f"same {r['same']:.4f}, "
            f"top-1 {r['acc_a']:.4f} / {r['acc_b']:.4f}, tokens {a_tokens} / {b_tokens}")

    def floor(out, patch, method=None, **budget):
        """The official float32 output against the same official configuration in float64, and
        (given ``method`` and its budget) the official float64 output against vitcompress's."""
        if not noise_floor:
            return {}
        o64, _ = run(patch(copy.deepcopy(base).double()), x.double(), batch)
        c = compare(o64, out, pred)
        res = {"floor_rel": c["rel"], "floor_agree": c["agree"], "floor_same": c["same"]}
        if method is not None:
            model64 = vitcompress.compress(copy.deepcopy(base).double(), method, **budget)
            c = compare(o64, run(model64, x.double(), batch)[0], pred)
            res.update({"f64_rel": c["rel"], "f64_same": c["same"]})
        return res

    ls_note = " + LayerScale shim" if layerscale else ""
    for r in tome_r:
        patch = lambda m, r=r: official_tome(m, off, r, prop_attn=True, layerscale=layerscale)  # noqa: E731
        o, ot = run(patch(copy.deepcopy(base)), x, batch)
        v, vt = run(vitcompress.compress(copy.deepcopy(base), "tome", r=r, prop_attn=True), x, batch)
        row("tome", f"r={r}", o, ot, v, vt, f"tome.patch.timm(m, prop_attn=True); m.r={r}{ls_note}",
            f"compress(m, 'tome', r={r}, prop_attn=True)")
        rows[-1].update(floor(o, patch, "tome", r=r, prop_attn=True))
    for ratio in pitome_ratio:
        patch = lambda m, ratio=ratio: official_pitome(m, off, ratio, layerscale=layerscale)  # noqa: E731
        o, ot = run(patch(copy.deepcopy(base)), x, batch)
        sched = official_schedule(ot)
        fl = floor(o, patch, "pitome", r=sched, prop_attn=False)
        call = f"pitome.patch.deit(m); m.ratio={ratio}{ls_note}"
        v, vt = run(vitcompress.compress(copy.deepcopy(base), "pitome", keep=ratio, prop_attn=False), x, batch)
        row("pitome", f"keep=ratio={ratio}", o, ot, v, vt, call,
            f"compress(m, 'pitome', keep={ratio}, prop_attn=False)")
        rows[-1].update({k: val for k, val in fl.items() if k.startswith("floor")})
        v2, vt2 = run(vitcompress.compress(copy.deepcopy(base), "pitome", r=sched, prop_attn=False), x, batch)
        row("pitome", f"ratio={ratio}, official counts", o, ot, v2, vt2, call,
            f"compress(m, 'pitome', r={sched}, prop_attn=False)")
        rows[-1].update(fl)
    # r = 0: the official code as is (no LayerScale shim) and vitcompress against the uncompressed model.
    o, ot = run(official_tome(copy.deepcopy(base), off, 0, prop_attn=True), x, batch)
    v, vt = run(vitcompress.compress(copy.deepcopy(base), "tome", r=0, prop_attn=True), x, batch)
    row("uncompressed vs official tome", "r=0", ref_out, ref_tokens, o, ot,
        "model(x)", "tome.patch.timm(m); m.r=0 (as is)")
    row("uncompressed vs vitcompress tome", "r=0", ref_out, ref_tokens, v, vt,
        "model(x)", "compress(m, 'tome', r=0)")
    o, ot = run(official_pitome(copy.deepcopy(base), off, 1.0), x, batch)
    row("uncompressed vs official pitome", "ratio=1.0", ref_out, ref_tokens, o, ot,
        "model(x)", "pitome.patch.deit(m); m.ratio=1.0 (as is)")
    if layerscale:
        o, ot = run(official_tome(copy.deepcopy(base), off, 0, prop_attn=True, layerscale=True), x, batch)
        row("uncompressed vs official tome", "r=0, LayerScale shim", ref_out, ref_tokens, o, ot,
            "model(x)", "tome.patch.timm(m); m.r=0 + LayerScale shim")
    return rows


def fmt_tokens(t: Sequence[int]) -> str:
    return "-".join(str(i) for i in t)


def markdown(rows: List[Dict]) -> str:
    """Columns a / b: official / vitcompress, or uncompressed / X in the "uncompressed vs X" rows."""
    floor = any("floor_rel" in r for r in rows)
    head = "| model | method | setting | max abs | rel | agree | same | top-1 a | top-1 b | tokens a | tokens b |"
    if floor:
        head += " official f32 vs f64: rel / agree / same | f64, official vs vitcompress: rel / same |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        same = r["tokens_a"] == r["tokens_b"]
        line = (f"| {r['model']} | {r['method']} | {r['setting']} | {r['max_abs']:.2e} | {r['rel']:.2e} "
                f"| {100 * r['agree']:.2f}% | {100 * r['same']:.1f}% | {100 * r['acc_a']:.2f}% | {100 * r['acc_b']:.2f}% "
                f"| {fmt_tokens(r['tokens_a'])} | {'same' if same else fmt_tokens(r['tokens_b'])} |")
        if floor:
            line += (f" {r['floor_rel']:.2e} / {100 * r['floor_agree']:.2f}% / {100 * r['floor_same']:.1f}% |"
                     if "floor_rel" in r else " |")
            line += f" {r['f64_rel']:.2e} / {100 * r['f64_same']:.1f}% |" if "f64_rel" in r else " |"
        lines.append(line)
    return "\n".join(lines)


def vitcompress_version() -> str:
    """The version of the vitcompress imported here, with the commit of its checkout."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(vitcompress.__file__)))
    try:
        head = subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", checkout, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return f"{vitcompress.__version__} ({head}{' + uncommitted changes' if dirty else ''})"
    except (OSError, subprocess.CalledProcessError):
        return vitcompress.__version__


def _floats(s: str) -> List[float]:
    return [float(v) for v in s.split(",") if v]


def _ints(s: str) -> List[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-dir", default=os.environ.get(ENV_VAR),
                   help=f"folder with ToMe/ and PiToMe/ (default ${ENV_VAR})")
    p.add_argument("--tome-r", type=_ints, default=[2, 4, 6], help="ToMe r values (default 2,4,6)")
    p.add_argument("--pitome-ratio", type=_floats, default=[0.9, 0.8, 0.7], help="PiToMe ratios = keep")
    p.add_argument("--realvit-tome-r", type=_ints, default=None, help="ToMe r on the real ViT (default: --tome-r)")
    p.add_argument("--num-images", type=int, default=None, help="reference images (default all 3000)")
    p.add_argument("--realvit-images", type=int, default=64, help="images for the real ViT-S/14 (default 64)")
    p.add_argument("--no-realvit", action="store_true", help="skip the real ViT-S/14")
    p.add_argument("--no-reference", action="store_true", help="skip the embedded reference model")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--realvit-batch", type=int, default=16)
    p.add_argument("--noise-floor", action="store_true",
                   help="also run each official configuration in float64: how far float rounding alone moves it")
    p.add_argument("--json", help="write the rows and versions here")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    off = load_official(args.official_dir)
    info = {"timm": __import__("timm").__version__, "torch": torch.__version__, "vitcompress": vitcompress_version(),
            "official": {k: f"github.com/{REPOS[k]}@{c}" for k, c in off.commits.items()}}
    print(json.dumps(info, indent=1))

    rows: List[Dict] = []
    if not args.no_reference:
        model, images, labels = reference_model.load(args.num_images)
        rows += compare_model("reference", model, images, labels, off, tome_r=args.tome_r,
                              pitome_ratio=args.pitome_ratio, batch=args.batch, layerscale=False,
                              noise_floor=args.noise_floor)
        if args.json:  # keep what is done if the real ViT part is interrupted
            with open(args.json, "w") as f:
                json.dump({"info": info, "rows": rows}, f, indent=1)

    if not args.no_realvit:
        real, why = load_realvit_or_none()
        if real is None:
            print(f"[realvit] skipped: {why}")
        else:
            with np.load(os.path.join(reference_model.data_dir(), reference_model.IMAGES_FILE)) as npz:
                raw, lab = npz["images"][:args.realvit_images], npz["labels"][:args.realvit_images]
            x = to_input(raw, realvit.IMG_SIZE, realvit.MEAN, realvit.STD)
            lab = torch.as_tensor(lab, dtype=torch.int64)
            emb, _ = run(real, x, args.realvit_batch)
            pred = centroid_predictor(emb, lab)
            rows += compare_model("realvit", real, x, lab, off, tome_r=args.realvit_tome_r or args.tome_r,
                                  pitome_ratio=args.pitome_ratio, batch=args.realvit_batch, layerscale=True,
                                  pred=pred, noise_floor=args.noise_floor)

    print()
    print("a = official, b = vitcompress; in the 'uncompressed vs X' rows a = the uncompressed model, b = X. "
          "rel = |a - b| / |a| (Frobenius); agree: same top-1; same: inputs whose outputs agree to 1e-4 of "
          "the output scale; tokens: entering each block, then after the last")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
