"""``vitcompress.tune``: the fastest setting within an accuracy budget, measured on the user's own
model, data and hardware.

A paper's speedup does not transfer: it depends on the device, the batch size, the precision and
the attention kernel, and random pruning at the same budget often does as well as a published
scorer. ``tune`` therefore measures, on the user's setup, every ViT method (and random pruning as
the baseline) over a grid of FLOPs budgets: quality on the user's data (top-1 with labels; top-1
agreement or embedding cosine with the uncompressed model without), then throughput at the batch
size and batch-1 latency of all settings in one interleaved run; it refines the budget of the
fastest settings that keep within ``max_drop``, and returns the Pareto front and the chosen setting.
"""
import copy
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import api
from .adapters import find_adapter
from .evaluation.classification import autocast
from .interfaces import runtime_of
from .methods import get as get_method
from .profile import compare_speed, count_flops
from .profile.conditions import describe_conditions

#: FLOPs fractions of the uncompressed model tried for every method (mild to aggressive).
DEFAULT_BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
METRICS = ("top1", "agreement", "cosine")
#: What each metric measures, in percent (a drop is in percentage points).
METRIC_MEANING = {"top1": "top-1 accuracy on the labels", "agreement": "top-1 agreement with the uncompressed model",
                  "cosine": "cosine of the outputs with the uncompressed model's, x100"}
RANDOM = "random"


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points ``(speed, quality)`` that no other point dominates (at least as fast and
    as good, and better in one), ordered by speed. Both are higher-is-better."""
    front = []
    for i, (speed, quality) in enumerate(points):
        dominated = any(s >= speed and q >= quality and (s > speed or q > quality)
                        for j, (s, q) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


# --------------------------------------------------------------------------- data


def _output(out) -> torch.Tensor:
    """The tensor a model's output stands for: itself, ``logits``, ``image_embeds`` / ``pooler_output``
    (transformers) or the first element of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "image_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"tune: the model returns a {type(out).__name__}; give a model returning logits or an embedding "
                    "tensor (e.g. a CLIP's image tower, model.visual)")


def _as_batches(data, model, batch_size: int, transform, class_names) -> Tuple[List[torch.Tensor],
                                                                                Optional[torch.Tensor]]:
    """The images of ``data`` as CPU batches of ``batch_size`` (read once, kept in memory for every
    setting) and their labels (None when unlabelled)."""
    import os

    if isinstance(data, (str, os.PathLike)):
        from .evaluation.classification import model_transform
        from .evaluation.folders import class_names_of, image_dataset, num_classes_of

        names = class_names if class_names is not None else class_names_of(model)
        data = image_dataset(os.fspath(data), transform or model_transform(model), names, num_classes_of(model),
                             labelled=None)
    if isinstance(data, torch.Tensor):
        images, labels = data, None
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
    else:
        if isinstance(data, torch.utils.data.Dataset):
            data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
        xs, ys = [], []
        for item in data:
            x, y = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
            xs.append(torch.as_tensor(x))
            if y is not None:
                ys.append(torch.as_tensor(y).reshape(-1))
        if not xs:
            raise ValueError("tune: data holds no images; give images (a tensor, (images, labels), a DataLoader or a "
                             "folder)")
        images = torch.cat(xs)
        labels = torch.cat(ys) if len(ys) == len(xs) else None
    if images.shape[0] == 0:
        raise ValueError("tune: data holds no images; give images (a tensor, (images, labels), a DataLoader or a "
                         "folder)")
    if labels is not None:
        labels = labels.long()
        if (labels < 0).all():  # a folder of unlabelled images
            labels = None
        elif len(labels) != len(images):
            raise ValueError(f"tune: {len(images)} images but {len(labels)} labels")
    return list(images.split(batch_size)), labels


# --------------------------------------------------------------------------- the result


@dataclass
class TuneResult:
    """What :func:`tune` measured. ``rows``: the uncompressed model first, then one dict per setting
    (method, budget, quality, drop, FLOPs ratio, images/s with its quartiles, speedup, batch-1
    latency, ...). ``chosen``: the row of the fastest setting whose drop is at most ``max_drop``
    (None: keep the model uncompressed, ``message`` says why)."""

    rows: List[Dict[str, Any]]
    metric: str
    max_drop: float
    chosen: Optional[Dict[str, Any]]
    message: str
    conditions: Dict[str, Any]
    warning: Optional[str] = None
    seconds: float = 0.0
    skipped: List[str] = field(default_factory=list)

    @property
    def baseline(self) -> Dict[str, Any]:
        return self.rows[0]

    @property
    def pareto(self) -> List[Dict[str, Any]]:
        """The rows no other row beats in both measured speedup and quality, slowest first."""
        timed = [r for r in self.rows if r.get("speedup") is not None]
        return [timed[i] for i in pareto_front([(r["speedup"], r["quality"]) for r in timed])]

    @property
    def compress_call(self) -> str:
        """The one line that applies the chosen setting."""
        if self.chosen is None:
            return "model  # uncompressed: " + self.message
        args = "".join(f", {k}={v!r}" for k, v in self.chosen["budget"].items())
        args += "".join(f", {k}={v!r}" for k, v in self.chosen.get("options", {}).items())
        return f"vitcompress.compress(model, {self.chosen['method']!r}{args})"

    def apply(self, model):
        """``model`` compressed with the chosen setting (in place), or restored to uncompressed."""
        if self.chosen is None:
            return api.restore(model) if runtime_of(model) is not None else model
        return api.compress(model, self.chosen["method"], **self.chosen["budget"], **self.chosen.get("options", {}))

    def to_dict(self) -> Dict[str, Any]:
        front = {id(r) for r in self.pareto}
        return {"metric": self.metric, "metric_meaning": METRIC_MEANING.get(self.metric, "the given callable"),
                "max_drop": self.max_drop, "conditions": self.conditions, "timing_warning": self.warning,
                "message": self.message, "compress_call": self.compress_call, "seconds": self.seconds,
                "skipped": self.skipped,
                "chosen": None if self.chosen is None else self.rows.index(self.chosen),
                "rows": [dict(r, on_pareto_front=id(r) in front) for r in self.rows]}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        """The rows as a table, the Pareto front and the chosen setting marked, the conditions below."""
        front = {id(r) for r in self.pareto}
        head = (f"{'method':<13}{'budget':<12}{'FLOPs':>7}{self.metric[:9]:>10}{'drop':>7}{'img/s':>9}"
                f"{'[q1-q3]':>15}{'speedup':>9}{'ideal':>7}{'lat ms':>8}  ")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            mark = ("*" if r is self.chosen else "") + ("P" if id(r) in front else "") + (
                " (refined, 2nd run)" if r.get("speed_run") == 2 else "")
            speed = (f"{r['images_per_s']:>9.1f}{r['images_per_s_q1']:>7.1f}-{r['images_per_s_q3']:<7.1f}"
                     f"{r['speedup']:>8.2f}x{r['ideal_speedup']:>6.2f}x{r['latency_ms']:>8.2f}"
                     if r.get("speedup") is not None else f"{'(not timed)':>9}{'':>15}{'':>9}{'':>7}{'':>8}")
            lines.append(f"{r['method']:<13}{r['setting']:<12}{100 * r['flops_ratio']:>6.1f}%{r['quality']:>10.2f}"
                         f"{r['drop']:>7.2f}{speed}  {mark}")
        lines.append(f"P: on the Pareto front (speedup vs {self.metric}); *: chosen (fastest with drop <= "
                     f"{self.max_drop:g}). {self.metric}: {METRIC_MEANING.get(self.metric, 'the given callable')}")
        lines.append(f"measured on {describe_conditions(self.conditions)}; img/s: median of interleaved runs "
                     "[quartiles]; speedup: over the uncompressed model timed in the same run; lat: batch-1 ms")
        if self.warning:
            lines.append("WARNING: " + self.warning)
        lines.append(self.message)
        lines.append("apply: " + self.compress_call)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str, title: Optional[str] = None) -> None:
        """Quality against measured speedup, a line per method (random pruning dashed), each
        method's ideal speedup from its FLOPs ratio dotted, the chosen setting starred."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        base = self.baseline
        methods = list(dict.fromkeys(r["method"] for r in self.rows[1:]))
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, method in enumerate(methods):
            rows = sorted((r for r in self.rows[1:] if r["method"] == method and r.get("speedup") is not None),
                          key=lambda r: -r["flops_ratio"])
            if not rows:
                continue
            color = "0.3" if method == RANDOM else colors[i % len(colors)]
            style = "--" if method == RANDOM else "-"
            ax.plot([1.0] + [r["speedup"] for r in rows], [base["quality"]] + [r["quality"] for r in rows],
                    style, marker="o", ms=4, color=color, label=method + (" (baseline)" if method == RANDOM else ""))
            ax.plot([1.0] + [r["ideal_speedup"] for r in rows], [base["quality"]] + [r["quality"] for r in rows],
                    ":", color=color, alpha=0.5, lw=1)
        ax.plot([], [], ":", color="0.5", label="ideal (FLOPs ratio)")
        ax.axhline(base["quality"] - self.max_drop, color="0.6", lw=0.8)
        ax.text(ax.get_xlim()[0], base["quality"] - self.max_drop, f" max drop {self.max_drop:g}", va="bottom",
                fontsize=8, color="0.4")
        ax.plot([1.0], [base["quality"]], "ks", ms=5, label="uncompressed")
        if self.chosen is not None:
            ax.plot([self.chosen["speedup"]], [self.chosen["quality"]], "*", ms=14, color="gold", mec="k",
                    label=f"chosen: {self.chosen['method']} {self.chosen['setting']}")
        ax.set_xlabel(f"measured speedup (batch {self.conditions['batch_size']}, {self.conditions['device']}, "
                      f"{self.conditions['dtype']})", fontsize=8)
        ax.set_ylabel(f"{self.metric} (%)")
        ax.set_title(title or "vitcompress tune: quality vs measured speedup", fontsize=10)
        if self.warning:
            ax.text(0.5, 0.02, "busy machine: speedups not reliable", transform=ax.transAxes, ha="center",
                    color="red", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


# --------------------------------------------------------------------------- measuring


def _weight_sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers: one compression each,
    without one copy of the weights per setting."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


class _Evaluator:
    """Runs models over the in-memory batches and scores their outputs against the uncompressed one's."""

    def __init__(self, batches, labels, metric, device, amp):
        self.batches, self.labels, self.metric, self.device, self.amp = batches, labels, metric, device, amp
        self.reference = None

    def outputs(self, model) -> torch.Tensor:
        outs = []
        with torch.inference_mode(), autocast(self.device, self.amp):
            for x in self.batches:
                out = _output(model(x.to(self.device)))
                outs.append(out.float().cpu() if self.metric not in ("top1", "agreement") else
                            out.float().argmax(dim=-1).cpu())
        return torch.cat(outs)

    def quality(self, outputs: torch.Tensor) -> float:
        if callable(self.metric):
            return float(self.metric(outputs, self.labels))
        if self.metric == "top1":
            return 100.0 * (outputs == self.labels).float().mean().item()
        if self.metric == "agreement":
            return 100.0 * (outputs == self.reference).float().mean().item()
        flat, ref = outputs.flatten(1), self.reference.flatten(1)
        return 100.0 * torch.nn.functional.cosine_similarity(flat, ref, dim=1).mean().item()


def _check_metric(metric, labels, outputs: torch.Tensor) -> None:
    """Refuse a metric the data or the model's outputs cannot give."""
    if callable(metric):
        return
    if metric not in METRICS:
        raise ValueError(f"tune: unknown metric {metric!r}; give one of {', '.join(METRICS)} or a callable "
                         "metric(outputs, labels) -> float (higher is better)")
    if metric == "top1" and labels is None:
        raise ValueError("tune: metric='top1' needs labelled data (images and labels, or one folder per class); "
                         "for unlabelled images give metric='agreement' (classifiers) or 'cosine' (embeddings)")
    if metric in ("top1", "agreement") and outputs.dim() != 2:
        raise ValueError(f"tune: metric={metric!r} needs class scores [batch, classes]; the model outputs "
                         f"{tuple(outputs.shape)}: give metric='cosine'")
    if metric == "top1" and int(labels.max()) >= outputs.shape[-1]:
        raise ValueError(f"tune: labels go up to {int(labels.max())} but the model scores {outputs.shape[-1]} "
                         "classes: check the data's labels (or folder names) against the model's classes")


def _setting_text(budget: Dict[str, Any]) -> str:
    return ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in budget.items()) or "default"


def tune(model: torch.nn.Module, data, *, max_drop: float = 0.5,
         metric: Optional[Union[str, Callable]] = None, methods: Optional[Sequence[str]] = None,
         budgets: Optional[Sequence[float]] = None, batch_size: int = 64, device=None, amp: bool = False,
         time_budget: Optional[float] = None, runs: int = 5, refine: int = 2, refine_steps: int = 2,
         random_baseline: bool = True, transform=None, class_names=None, progress: bool = True) -> TuneResult:
    """The fastest compression of ``model`` that loses at most ``max_drop`` points of ``metric`` on
    ``data``, measured on ``device``.

    ``data``: images ``[N, C, H, W]``, ``(images, labels)``, a Dataset / DataLoader of ``(x, y)`` or
    ``x``, or a folder (an ImageFolder, matched to the model's classes by name, or a folder of
    unlabelled images; ``transform`` / ``class_names`` override the model's own). ``metric``:
    ``"top1"`` (labels), ``"agreement"`` (top-1 agreement with the uncompressed model),
    ``"cosine"`` (output cosine, x100) or ``metric(outputs, labels) -> float``; by default top-1
    with labels, else agreement for a classifier and cosine for an embedding model. ``methods``:
    the ViT methods to try (default: every static one); ``random`` pruning runs at every budget
    as the baseline. ``budgets``: FLOPs fractions (default :data:`DEFAULT_BUDGETS`); the fastest
    ``refine`` methods within ``max_drop`` get ``refine_steps`` bisections of their budget.
    Speed: images/s at ``batch_size`` and batch-1 latency of every setting in one interleaved run of
    ``runs`` rounds (:func:`~vitcompress.profile.compare_speed`), under mixed precision with ``amp``.
    ``time_budget`` (seconds) caps the whole search; too short for one setting is an error.
    """
    start = time.perf_counter()
    if not (isinstance(max_drop, (int, float)) and max_drop >= 0):
        raise ValueError(f"tune: max_drop={max_drop!r} must be a number >= 0 (points of the metric, e.g. 0.5)")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"tune: time_budget={time_budget!r} must be a number of seconds > 0")
    adapter = find_adapter(model)
    if "vit" not in adapter.targets:
        raise TypeError(f"tune: a {adapter.family} is not a ViT-like encoder; tune compresses timm, open_clip and "
                        "Hugging Face ViTs (for a CLIP or LLaVA give its image tower)")
    vit_methods = [m for m in api.list_methods("vit") if not get_method(m).dynamic and m != RANDOM]
    if methods is None:
        methods = vit_methods
    for m in methods:
        if m not in vit_methods and m != RANDOM:
            raise ValueError(f"tune: method {m!r} is not a static ViT method; choose from {', '.join(vit_methods)}")
    methods = [m for m in methods if m != RANDOM] + ([RANDOM] if random_baseline or RANDOM in methods else [])
    budgets = sorted(set(DEFAULT_BUDGETS if budgets is None else budgets), reverse=True)
    if not budgets or not all(0 < b < 1 for b in budgets):
        raise ValueError(f"tune: budgets={list(budgets)} must be FLOPs fractions in (0, 1), e.g. [0.8, 0.6]")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batches, labels = _as_batches(data, model, batch_size, transform, class_names)
    model = model.to(device).eval()
    if runtime_of(model) is not None:
        raise ValueError("tune: the model is already compressed; give the uncompressed model "
                         "(vitcompress.restore(model))")

    from tqdm.auto import tqdm

    grid = [(m, {"flops": b}) for b in budgets for m in methods]
    bar = tqdm(total=len(grid) + 2, desc="tune", disable=not progress)
    bar.set_postfix_str("uncompressed")
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(device, amp):
        first = _output(model(batches[0][:2].to(device)))
    if metric is None:
        from .evaluation.folders import num_classes_of

        metric = "top1" if labels is not None else ("agreement" if first.dim() == 2 and (num_classes_of(model)
                                                                                        or 0) > 1 else "cosine")
    _check_metric(metric, labels, first)
    evaluator = _Evaluator(batches, labels, metric, device, amp)
    reference_out = evaluator.outputs(model)
    evaluator.reference = reference_out
    one_eval = time.perf_counter() - t0
    sample = batches[0][:1].to(device)
    base_flops = count_flops(model, sample)
    base = {"method": "none", "setting": "uncompressed", "budget": {}, "quality": evaluator.quality(reference_out),
            "drop": 0.0, "flops_ratio": 1.0, "stage": "baseline"}
    rows = [base]
    bar.update(1)

    speed_inputs = torch.cat(batches)[:batch_size].to(device)
    with autocast(device, amp), torch.inference_mode():
        t1 = time.perf_counter()
        model(speed_inputs)
        one_forward = time.perf_counter() - t1
    skipped: List[str] = []

    def speed_cost(n_models: int) -> float:  # warm-up + runs at batch_size, latency at batch 1
        return n_models * (runs + 1) * one_forward * 1.3 + n_models * max(3, runs) * one_forward / batch_size * 2

    if time_budget is not None:
        least = one_eval * 2 + speed_cost(2)
        if time.perf_counter() - start + least - one_eval > time_budget:
            bar.close()
            raise ValueError(f"tune: time_budget={time_budget:g} s is too short: one pass over the data takes "
                             f"{one_eval:.1f} s here, so one setting needs about {least:.0f} s; give at least "
                             f"{math.ceil(least * 3)} s, or fewer images")

    def fits(extra_evals: int, timed: int) -> bool:
        if time_budget is None:
            return True
        return time.perf_counter() - start + extra_evals * one_eval * 1.2 + speed_cost(timed) <= time_budget

    def evaluate(method: str, budget: Dict[str, Any], stage: str) -> Optional[Dict[str, Any]]:
        bar.set_postfix_str(f"{method} {_setting_text(budget)}")
        compressed = _weight_sharing_copy(model)
        try:
            api.compress(compressed, method, **budget)
        except (ValueError, TypeError) as err:  # a budget this model cannot reach with this method
            skipped.append(f"{method} {_setting_text(budget)}: {' '.join(str(err).split())}")
            return None
        quality = evaluator.quality(evaluator.outputs(compressed))
        flops = count_flops(compressed, sample)
        row = {"method": method, "setting": _setting_text(budget), "budget": dict(budget), "quality": quality,
               "drop": base["quality"] - quality, "flops_ratio": flops / base_flops, "stage": stage,
               "tokens_per_layer": api.stats(compressed)["planned_tokens_per_layer"], "model": compressed}
        rows.append(row)
        return row

    for method, budget in grid:
        if not fits(1, len(rows) + 1):
            skipped.append(f"{method} {_setting_text(budget)}: not evaluated, time_budget reached")
            bar.update(1)
            continue
        evaluate(method, budget, "grid")
        bar.update(1)

    bar.set_postfix_str(f"timing {len(rows)} models x {runs} interleaved runs")
    conditions, warning = _time(rows, model, speed_inputs, device, amp, runs, run=1)
    bar.update(1)

    def passing(candidates):
        return [r for r in candidates if r["method"] != "none" and r["drop"] <= max_drop]

    best = sorted(passing(rows[1:]), key=lambda r: (-r["speedup"], -r["quality"]))
    targets = list(dict.fromkeys(r["method"] for r in best))[:refine]
    refined: List[Dict[str, Any]] = []
    for method in targets:
        mine = [r for r in rows if r["method"] == method and "flops" in r["budget"]]
        ok = min((r["budget"]["flops"] for r in mine if r["drop"] <= max_drop), default=None)
        bad = max((r["budget"]["flops"] for r in mine if r["drop"] > max_drop and r["budget"]["flops"] < (ok or 0)),
                  default=None)
        if ok is None:
            continue
        low = bad if bad is not None else max(0.05, ok - (budgets[0] - budgets[-1]) / max(1, len(budgets) - 1))
        for _ in range(refine_steps):
            middle = round((ok + low) / 2, 4)
            if abs(ok - middle) < 0.005 or not fits(1, len(refined) + 3):
                break
            bar.total += 1
            row = evaluate(method, {"flops": middle}, "refined")
            bar.update(1)
            if row is None:
                low = middle
                continue
            refined.append(row)
            if row["drop"] <= max_drop:
                ok = middle
            else:
                low = middle
    if refined:
        bar.set_postfix_str(f"timing {len(refined)} refined settings")
        warning = _time(refined, model, speed_inputs, device, amp, runs, run=2)[1] or warning
    bar.close()
    for row in rows:
        row.pop("model", None)

    winners = sorted(passing(rows), key=lambda r: (-r["speedup"], -r["quality"]))
    chosen = winners[0] if winners and winners[0]["speedup"] > 1.0 else None
    if chosen is not None:
        message = (f"chosen: {chosen['method']} {chosen['setting']}: {chosen['speedup']:.2f}x images/s, "
                   f"{metric if isinstance(metric, str) else 'metric'} {chosen['quality']:.2f} "
                   f"(drop {chosen['drop']:.2f} <= {max_drop:g})")
    elif winners:
        message = (f"no setting within max_drop={max_drop:g} is faster than the uncompressed model on this device "
                   f"(best: {winners[0]['method']} {winners[0]['setting']} at {winners[0]['speedup']:.2f}x); "
                   "keep the model uncompressed")
    else:
        mildest = min(rows[1:], key=lambda r: r["drop"], default=None)
        detail = (f" (the smallest drop: {mildest['method']} {mildest['setting']} loses {mildest['drop']:.2f})"
                  if mildest else "")
        message = (f"no setting loses at most max_drop={max_drop:g} points{detail}; the model stays uncompressed "
                   "(raise max_drop or try milder budgets)")
    return TuneResult(rows=rows, metric=metric if isinstance(metric, str) else getattr(metric, "__name__", "metric"),
                      max_drop=float(max_drop), chosen=chosen, message=message, conditions=conditions,
                      warning=warning, seconds=time.perf_counter() - start, skipped=skipped)


def _time(rows, model, inputs, device, amp, runs: int, run: int):
    """Time the uncompressed ``model`` and the models of ``rows`` in one interleaved run and write
    into each row its images/s (median, quartiles, every run), speedup over the uncompressed model
    of the same run, ideal speedup (FLOPs) and batch-1 latency. Returns the run's conditions and
    timing warning."""
    timed = {"uncompressed": model}
    timed.update((str(i), r["model"]) for i, r in enumerate(rows) if r["method"] != "none")
    with autocast(device, amp):
        speed = compare_speed(timed, inputs, warmup=1, runs=runs, memory=False)
    base = speed["uncompressed"]
    for i, row in enumerate(rows):
        s = speed["uncompressed" if row["method"] == "none" else str(i)]
        row.update(images_per_s=s["throughput"], images_per_s_q1=s["throughput_q1"],
                   images_per_s_q3=s["throughput_q3"], images_per_s_runs=s["throughput_runs"],
                   speedup=s["throughput"] / base["throughput"], ideal_speedup=1.0 / row["flops_ratio"],
                   latency_ms=s["latency_ms"], latency_speedup=base["latency_ms"] / s["latency_ms"], speed_run=run)
    return base["conditions"], base["timing_warning"]


__all__ = ["tune", "TuneResult", "pareto_front", "DEFAULT_BUDGETS", "METRICS"]
