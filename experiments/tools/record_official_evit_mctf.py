#!/usr/bin/env python3
r"""Record the official EViT / MCTF outputs that ``tests/test_official_evit_mctf.py`` checks in every run.

    # fetch the official code (the only step that needs the network), then record:
    python experiments/tools/record_official_evit_mctf.py --fetch /tmp/official
    # or record from a folder already holding evit/ and MCTF/:
    python experiments/tools/record_official_evit_mctf.py --official-dir /tmp/official

``--fetch DIR`` clones github.com/youweiliang/evit and github.com/mlvlab/MCTF into ``DIR/evit`` and
``DIR/MCTF`` at the pinned commits (``EVIT_COMMIT`` / ``MCTF_COMMIT``). The official code is imported
from there (a stub stands in for ``torchprofile``, which EViT's ``helpers.py`` imports for a FLOPs
counter it does not use here) and is **not** stored: the recording (``tests/data/official_evit_mctf.pt``)
holds only the inputs generated here and what the official code returned for them:

* ``evit``: the official ``EViT`` model (``evit.py``, ``fuse_token=True``) built with the embedded
  reference ViT's configuration and weights (``vitcompress.evaluation.reference_model``), with a keep
  rate in some blocks, on the first ``--images`` shipped images: the logits and the tokens left after
  each block (``forward_features``' ``left_tokens``).
* ``mctf``: the official ``mctf()`` (``utils/mctf.py``: bipartite matching with the three criteria,
  bidirectional or not, and ``merge_wavg`` with ``pooling_type=1``) on random tokens, attention
  probabilities and sizes, class token first or no protected token: the fused tokens, their sizes and
  the source map (``merge_source``).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch

from vitcompress.evaluation import reference_model

import official_repos  # the folder of this script: experiments/tools/

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EVIT_URL, EVIT_COMMIT = "https://github.com/youweiliang/evit", "5ca95a7cf4a8637193284895c5bc0dd9dc365982"
MCTF_URL, MCTF_COMMIT = "https://github.com/mlvlab/MCTF", "2004da0cad3231fa74cbd60b6042b0bd133aacde"
REPOS = {"evit": (EVIT_URL, EVIT_COMMIT), "MCTF": (MCTF_URL, MCTF_COMMIT)}
DEFAULT_OUT = os.path.join(_ROOT, "tests", "data", "official_evit_mctf.pt")

# (keep rate, the blocks that reduce) on the 6-block reference ViT; (1, 3, 4) is evit's default there
EVIT_CASES = [(0.7, (1, 3, 4)), (0.5, (1, 3, 4)), (0.8, (0, 1, 2, 3, 4, 5)), (0.3, (2,))]
MCTF_CASES = [
    dict(T=17, r=4, protected=1, bidirection=1, taus=(1, 20, 40), sizes=True, seed=0),
    dict(T=48, r=12, protected=1, bidirection=1, taus=(1, 20, 40), sizes=True, seed=1),
    dict(T=45, r=15, protected=1, bidirection=1, taus=(2, 5, 10), sizes=True, seed=2),
    dict(T=33, r=6, protected=1, bidirection=0, taus=(1, 20, 40), sizes=True, seed=3),
    dict(T=40, r=8, protected=0, bidirection=1, taus=(1, 20, 40), sizes=True, seed=4),
    dict(T=50, r=12, protected=1, bidirection=1, taus=(1, 20, 40), sizes=False, seed=5),  # the first fusion
    dict(T=17, r=8, protected=1, bidirection=1, taus=(1, 20, 40), sizes=True, seed=6),  # r clamped to keep 10
    dict(T=30, r=6, protected=1, bidirection=1, taus=(0, 20, 0), sizes=True, seed=7),  # criteria left out
]




def load_official(root: str):
    """``(evit module, MCTF's utils/mctf.py module)`` imported from ``root``."""
    sys.modules.setdefault("torchprofile", types.SimpleNamespace(profile_macs=None))
    sys.path.insert(0, os.path.join(root, "evit"))
    import evit
    spec = importlib.util.spec_from_file_location("official_mctf", os.path.join(root, "MCTF", "utils", "mctf.py"))
    mctf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mctf)
    return evit, mctf


def official_evit_model(evit, model, keep_rate: float, layers) -> torch.nn.Module:
    """The official EViT with the reference ViT's configuration and weights."""
    import functools
    depth = len(model.blocks)
    rates = tuple(keep_rate if i in layers else 1 for i in range(depth))
    embed = model.embed_dim
    official = evit.EViT(img_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
                         in_chans=model.patch_embed.proj.in_channels, num_classes=model.num_classes, embed_dim=embed,
                         depth=depth, num_heads=model.blocks[0].attn.num_heads, mlp_ratio=4.0, qkv_bias=True,
                         norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), keep_rate=rates, fuse_token=True)
    missing, unexpected = official.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto the official EViT: missing {missing}, unexpected {unexpected}")
    return official.eval()


def _mctf_inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    B, T, C, H = 2, case["T"], 16, 2
    x = torch.randn(B, T, C, generator=g)
    attn = (torch.randn(B, H, T, T, generator=g) * 2).softmax(dim=-1)
    size = torch.randint(1, 6, (B, T, 1), generator=g).float()
    if case["protected"]:
        size[:, : case["protected"]] = 1.0
    return x, attn, size if case["sizes"] else None


def record(official_dir: str, out: str, images: int) -> dict:
    evit, mctf = load_official(official_dir)
    data = {"commits": {"evit": EVIT_COMMIT, "MCTF": MCTF_COMMIT}, "evit": [], "mctf": []}

    model, x, _ = reference_model.load(images)
    data["images"] = images
    data["image_checksum"] = float(x.double().sum())
    for keep_rate, layers in EVIT_CASES:
        official = official_evit_model(evit, model, keep_rate, layers)
        with torch.no_grad():
            features, left_tokens, _ = official.forward_features(x)
            logits = official.head(features)
        data["evit"].append(dict(keep_rate=keep_rate, layers=layers, logits=logits, left_tokens=left_tokens))

    for case in MCTF_CASES:
        x_in, attn, size = _mctf_inputs(case)
        tau_sim, tau_info, tau_size = case["taus"]
        info = {"num_protected": case["protected"], "r_eval": case["r"], "tau_sim": tau_sim, "tau_info": tau_info,
                "tau_size": tau_size, "student_size": size, "bidirection": case["bidirection"], "trace_source": 1,
                "student_source": None, "one_step_ahead": 0, "pooling_type": 1}
        with torch.no_grad():
            out_x, _ = mctf.mctf(x_in, attn, info, "student_")
        data["mctf"].append(dict(case, x=x_in, attn=attn, size=size, out_x=out_x, out_size=info["student_size"],
                                 out_source=info["student_source"]))
    return official_repos.save(data, out)


def main(argv=None) -> int:
    parser = official_repos.arguments(__doc__, REPOS, DEFAULT_OUT, "reference images per EViT case (default 32)")
    args = parser.parse_args(argv)
    root = official_repos.official_root(args, REPOS)
    data = record(root, args.out, args.images)
    print(f"recorded {len(data['evit'])} EViT model cases and {len(data['mctf'])} MCTF function cases from "
          f"evit {EVIT_COMMIT[:8]}, MCTF {MCTF_COMMIT[:8]} into {args.out} ({os.path.getsize(args.out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
