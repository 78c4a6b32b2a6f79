#!/usr/bin/env python3
r"""Record the official PPT and ATC outputs that ``tests/test_official_ppt_atc.py`` checks in every run.

    # the official files, taken from a clone of each repository (or the fetch tool's snapshot):
    #   DIR/PPT/{ppt_deit,tome}.py                                 github.com/xjwu1024/PPT
    #   DIR/ATC/SSLBackbone_setup/token_reduc/{merge,utils}.py,    github.com/JoakimHaurum/ATC
    #   DIR/ATC/SSLBackbone_setup/token_reduc/patch/timm.py, DIR/ATC/ATC_setup/models/atc.py
    python experiments/tools/record_official_ppt_atc.py --fetch /tmp/official_pa
    python experiments/tools/record_official_ppt_atc.py --official-dir /tmp/official_pa

The official ATC clusters with scikit-learn, which vitcompress does not need; install it apart, e.g.
``pip install --target /tmp/atc_site --no-deps scikit-learn scipy joblib threadpoolctl`` and run with
``PYTHONPATH=$PWD:/tmp/atc_site``. The official code is loaded by path at run time and is **not**
stored: the recording (``tests/data/official_ppt_atc.pt``) holds the random inputs made here and what
the official functions and patched models returned:

* ``ppt_scores``: PPT's ``PPTAttention.score_assignment_step(attn, v)`` on random attention / values.
* ``ppt_models``: the embedded reference ViT (6 blocks, 65 tokens) patched with PPT's ``apply_patch``
  (``prop_attn=True``, ``pp_loc_list``, ``threshold``; ``model.r``) on the first ``--images`` shipped
  images: logits, tokens entering each block, and each image's choice in each reducing block (the
  variance of the official scores against the threshold; True = pooled). Thresholds: the official
  7e-5, 0 (every image prunes), 1 (every image pools) and the median variance of the first reducing
  block
  (half way between the two middle ones: a mixed batch).
* ``atc_labels``: ATC's ``agglomerative_clustering(metric, num_clusters, linkage, class_token=True)``
  (``ATC_setup/models/atc.py``, scikit-learn) on random metrics: the cluster of each token, per linkage.
* ``atc_models``: the reference ViT patched with ATC's off-the-shelf timm patch
  (``SSLBackbone_setup/token_reduc/patch/timm.py``, ``merge_type="atc"``, every block, ``model.r``):
  logits and tokens entering each block, per linkage.

Shim: none beyond loading by path (the packages' ``__init__`` files, which import modules not taken,
are replaced by empty packages). Both patches run unchanged on timm 1.x for this model (no LayerScale,
no registers).
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import subprocess
import sys
import types
import warnings

import torch

from vitcompress.evaluation import reference_model

import official_repos  # the folder of this script: experiments/tools/

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))

PPT_URL, PPT_COMMIT = "https://github.com/xjwu1024/PPT", "706bcdd475b5652ee84117a88add7a3a49c6045b"
ATC_URL, ATC_COMMIT = "https://github.com/JoakimHaurum/ATC", "227c94b584df323b94dd79e8ddbb88b1587eeb8e"
REPOS = {"PPT": (PPT_URL, PPT_COMMIT), "ATC": (ATC_URL, ATC_COMMIT)}
DEFAULT_OUT = os.path.join(_ROOT, "tests", "data", "official_ppt_atc.pt")

PPT_LAYERS = [1, 3, 4]  # vitcompress's default for 6 blocks (blocks 3, 6, 9 of 12 as quarters)
PPT_R = 8
PPT_THRESHOLDS = [7e-5, 0.0, 1.0, "median"]
ATC_LINKAGES = ["average", "complete", "single"]
ATC_LABEL_CASES = [dict(T=17, clusters=10, seed=0), dict(T=33, clusters=24, seed=1), dict(T=33, clusters=6, seed=2)]
ATC_R = 5  # the off-the-shelf patch's r (it removes r - 1 tokens per block with a class token)




def _commit(repo: str) -> str:
    path = os.path.join(repo, "COMMIT")
    if os.path.exists(path):
        return open(path).read().strip()
    return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def _package(name: str, folder: str) -> None:
    """An empty package ``name`` at ``folder`` (its ``__init__`` is not run)."""
    module = types.ModuleType(name)
    module.__path__ = [folder]
    sys.modules[name] = module


def load_official(root: str) -> types.SimpleNamespace:
    ppt_dir, atc_dir = os.path.join(root, "PPT"), os.path.join(root, "ATC")
    sys.path.insert(0, ppt_dir)
    sys.path.insert(0, atc_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm.models.layers is deprecated in timm 1.x
        ppt = importlib.import_module("ppt_deit")
        for name in ("SSLBackbone_setup", "SSLBackbone_setup.token_reduc", "SSLBackbone_setup.token_reduc.patch",
                     "ATC_setup", "ATC_setup.models"):
            _package(name, os.path.join(atc_dir, *name.split(".")))
        atc_patch = importlib.import_module("SSLBackbone_setup.token_reduc.patch.timm")
        atc_models = importlib.import_module("ATC_setup.models.atc")
    return types.SimpleNamespace(ppt=ppt, atc_patch=atc_patch, atc_models=atc_models,
                                 commits={"PPT": _commit(ppt_dir), "ATC": _commit(atc_dir)})


def _run(model, x):
    """Logits and the tokens entering each block (+ the final count)."""
    counts = []
    handles = [b.register_forward_pre_hook(lambda m, a: counts.append(int(a[0].shape[1]))) for b in model.blocks]
    handles.append(model.norm.register_forward_pre_hook(lambda m, a: counts.append(int(a[0].shape[1]))))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out.float(), counts


def ppt_model(off, base, x, threshold):
    """The official PPT on ``base``: logits, tokens per block, choices [len(PPT_LAYERS), B] (True = pool)."""
    model = copy.deepcopy(base)
    off.ppt.apply_patch(model, prop_attn=True, pp_loc_list=PPT_LAYERS, threshold=threshold)
    model.r = PPT_R
    scores = []
    step = off.ppt.PPTAttention.score_assignment_step

    def recording_step(attn, v):
        scores.append(step(attn, v))
        return scores[-1]

    off.ppt.PPTAttention.score_assignment_step = staticmethod(recording_step)
    try:
        logits, counts = _run(model, x)
    finally:
        off.ppt.PPTAttention.score_assignment_step = staticmethod(step)
    variances = torch.stack([torch.var(scores[layer], dim=1) for layer in PPT_LAYERS])  # as pp_block_adaptive
    return logits, counts, variances


def record(root: str, out: str, images: int) -> dict:
    off = load_official(root)
    data = {"commits": off.commits, "ppt_scores": [], "ppt_models": [], "atc_labels": [], "atc_models": []}
    g = torch.Generator().manual_seed(0)
    for B, H, N, d in ((2, 3, 17, 8), (3, 4, 33, 16)):
        attn = torch.randn(B, H, N, N, generator=g).mul(2).softmax(dim=-1)
        v = torch.randn(B, H, N, d, generator=g)
        data["ppt_scores"].append(dict(attn=attn, v=v, scores=off.ppt.PPTAttention.score_assignment_step(attn, v)))

    model, x, _ = reference_model.load(images)
    data["images"] = images
    data["image_checksum"] = float(x.double().sum())
    for threshold in PPT_THRESHOLDS:
        if threshold == "median":  # half way between the two middle variances: no image on the edge
            middle = ppt_model(off, model, x, 7e-5)[2][0].sort().values[len(x) // 2 - 1:len(x) // 2 + 1]
            threshold = float(middle.mean())
        logits, counts, variances = ppt_model(off, model, x, threshold)
        data["ppt_models"].append(dict(layers=PPT_LAYERS, r=PPT_R, threshold=threshold, logits=logits, tokens=counts,
                                       pooled=variances < threshold))

    for case in ATC_LABEL_CASES:
        metric = torch.randn(2, case["T"], 16, generator=torch.Generator().manual_seed(case["seed"]))
        for linkage in ATC_LINKAGES:
            _, _, labels = off.atc_models.agglomerative_clustering(metric, case["clusters"], linkage, class_token=True)
            data["atc_labels"].append(dict(case, linkage=linkage, metric=metric, labels=labels))
    for linkage in ATC_LINKAGES:
        patched = copy.deepcopy(model)
        off.atc_patch.apply_patch(patched, merge_type="atc", linkage=linkage, prop_attn=True)
        patched.r = ATC_R
        logits, counts = _run(patched, x)
        data["atc_models"].append(dict(linkage=linkage, r=ATC_R, logits=logits, tokens=counts))
    return official_repos.save(data, out)


def main(argv=None) -> int:
    parser = official_repos.arguments(__doc__, REPOS, DEFAULT_OUT, "reference images per model case (default 32)")
    args = parser.parse_args(argv)
    root = official_repos.official_root(args, REPOS)
    data = record(root, args.out, args.images)
    mixed = [float(c["pooled"].float().mean()) for c in data["ppt_models"]]
    print(f"recorded {len(data['ppt_scores'])} PPT score cases, {len(data['ppt_models'])} PPT model cases "
          f"(pooled fractions {[round(m, 3) for m in mixed]}), {len(data['atc_labels'])} ATC clusterings and "
          f"{len(data['atc_models'])} ATC model cases from PPT {data['commits']['PPT'][:8]}, "
          f"ATC {data['commits']['ATC'][:8]} into {args.out} ({os.path.getsize(args.out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
