#!/usr/bin/env python3
r"""Record the official ToMe / PiToMe outputs that ``tests/test_official_recorded.py`` checks in every run.

    # fetch the official code (the only step that needs the network), then record:
    python experiments/tools/record_official.py --fetch /tmp/official
    # or record from a folder already holding ToMe/ and PiToMe/ (as for compare_official.py):
    python experiments/tools/record_official.py --official-dir /tmp/official

``--fetch DIR`` clones github.com/facebookresearch/ToMe and github.com/hchautran/PiToMe into
``DIR/ToMe`` and ``DIR/PiToMe`` and checks out the pinned commits (``TOME_COMMIT`` / ``PITOME_COMMIT``
below; ``--no-pin`` keeps their heads). The official code is loaded by path as
``experiments/studies/compare_official.py`` does and is **not** stored: the recording
(``tests/data/official_tome_pitome.pt``, default ``--out``) holds only random inputs generated here
and what the official functions returned for them:

* ``parse_r``: ToMe's ``tome.utils.parse_r(depth, r)`` for constant ``r`` and ``(r, inflection)``
  ramps (several where Python's ``int`` and ``round`` differ).
* ``tome``: ToMe's ``bipartite_soft_matching(metric, r, class_token=True)`` + ``merge_wavg`` on random
  metrics / tokens / sizes (class token first): the merged tokens and sizes.
* ``pitome``: PiToMe's ``pitome_vision(metric, ratio, margin, class_token=True, alpha,
  use_bsm_pitome)`` + ``merge_wavg``, both matchings, several margins and ``alpha`` values.
* ``models``: the embedded reference ViT (``vitcompress.evaluation.reference_model``) patched with
  the official ToMe timm patch (``prop_attn=True``; constant ``r`` and an ``(r, inflection)`` ramp)
  and the official PiToMe DeiT patch (``ratio``), on the first ``--images`` shipped images: the
  logits and the tokens entering each block.
"""
from __future__ import annotations

import copy
import os
import sys

import torch

from vitcompress.evaluation import reference_model

import official_repos  # the folder of this script: experiments/tools/

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))

TOME_URL, TOME_COMMIT = "https://github.com/facebookresearch/ToMe", "af95e4b1befa172dadccd8c81e223b10090f9579"
PITOME_URL, PITOME_COMMIT = "https://github.com/hchautran/PiToMe", "550b5deed94aadfeac28bfbe381d87e672044a40"
REPOS = {"ToMe": (TOME_URL, TOME_COMMIT), "PiToMe": (PITOME_URL, PITOME_COMMIT)}
DEFAULT_OUT = os.path.join(_ROOT, "tests", "data", "official_tome_pitome.pt")

PARSE_R_CASES = [(6, (4, -0.5)), (12, (8, -1.0)), (12, (5, 0.3)), (7, (3, 0.5)), (12, (16, -0.25)),
                 (24, (7, 0.9)), (5, (2, -0.7)), (12, (13, 0.1)), (12, 8), (4, (3, 0.0))]
TOME_CASES = [dict(T=17, r=4, seed=0), dict(T=66, r=16, seed=1), dict(T=66, r=33, seed=2), dict(T=33, r=1, seed=3)]
PITOME_CASES = [dict(T=17, ratio=0.7, margin=0.75, alpha=1.0, bsm=False, seed=10),
                dict(T=65, ratio=0.8, margin=0.5, alpha=0.5, bsm=False, seed=11),
                dict(T=65, ratio=0.8, margin=0.5, alpha=0.5, bsm=True, seed=12),
                dict(T=33, ratio=0.9, margin=0.25, alpha=2.0, bsm=True, seed=13),
                dict(T=49, ratio=0.6, margin=0.0, alpha=0.3, bsm=False, seed=14)]
MODEL_CASES = [("tome", 2), ("tome", 4), ("tome", 6), ("tome", (4, -0.5)), ("tome", (3, 0.7)),
               ("pitome", 0.9), ("pitome", 0.8), ("pitome", 0.7)]




def _load_compare_official():
    import importlib.util
    path = os.path.join(_ROOT, "experiments", "studies", "compare_official.py")
    spec = importlib.util.spec_from_file_location("compare_official", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _inputs(T: int, seed: int, dim: int = 16, channels: int = 8, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, T, dim, generator=g)
    x = torch.randn(batch, T, channels, generator=g)
    size = torch.randint(1, 5, (batch, T, 1), generator=g).float()
    return metric, x, size


def record(official_dir: str, out: str, images: int) -> dict:
    co = _load_compare_official()
    off = co.load_official(official_dir)
    tome_merge = sys.modules["tome.merge"]
    tome_utils = sys.modules["tome.utils"]
    import importlib
    pitome_merge = importlib.import_module("algo.pitome.merge")

    data = {"commits": off.commits, "parse_r": [], "tome": [], "pitome": [], "models": []}
    for depth, r in PARSE_R_CASES:
        data["parse_r"].append(dict(depth=depth, r=r, schedule=list(tome_utils.parse_r(depth, r))))
    for case in TOME_CASES:
        metric, x, size = _inputs(case["T"], case["seed"])
        merge, _ = tome_merge.bipartite_soft_matching(metric, case["r"], class_token=True, distill_token=False)
        new_x, new_size = tome_merge.merge_wavg(merge, x, size)
        data["tome"].append(dict(case, metric=metric, x=x, size=size, out_x=new_x, out_size=new_size))
    for case in PITOME_CASES:
        metric, x, size = _inputs(case["T"], case["seed"])
        merge = pitome_merge.pitome_vision(metric=metric, ratio=case["ratio"], margin=case["margin"],
                                           class_token=True, alpha=case["alpha"], use_bsm_pitome=case["bsm"])
        new_x, new_size = pitome_merge.merge_wavg(merge, x, size)
        data["pitome"].append(dict(case, metric=metric, x=x, size=size, out_x=new_x, out_size=new_size))

    model, x, _ = reference_model.load(images)
    data["images"] = images
    data["image_checksum"] = float(x.double().sum())
    for method, budget in MODEL_CASES:
        if method == "tome":
            patched = co.official_tome(copy.deepcopy(model), off, budget, prop_attn=True)
        else:
            patched = co.official_pitome(copy.deepcopy(model), off, budget)
        with torch.no_grad():
            logits, counts = co.run(patched, x, len(x))
        data["models"].append(dict(method=method, budget=budget, logits=logits, tokens=counts))
    return official_repos.save(data, out)


def main(argv=None) -> int:
    parser = official_repos.arguments(__doc__, REPOS, DEFAULT_OUT, "reference images per model case (default 32)",
                                      can_unpin=True)
    args = parser.parse_args(argv)
    root = official_repos.official_root(args, REPOS)
    data = record(root, args.out, args.images)
    print(f"recorded {len(data['parse_r'])} parse_r, {len(data['tome'])} ToMe, {len(data['pitome'])} PiToMe "
          f"function cases and {len(data['models'])} model cases from ToMe {data['commits']['ToMe'][:8]}, "
          f"PiToMe {data['commits']['PiToMe'][:8]} into {args.out} ({os.path.getsize(args.out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
