"""What ``vitcompress bench`` shows: the table, the plots, and the hardware they were measured on."""
import datetime
import platform
from typing import Any, Dict, List, Optional

from ..evaluation import models

#: The image files ``--plot`` writes.
PLOT_EXTENSIONS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def hardware(device: str = "cpu", threads: Optional[int] = None) -> str:
    """``"Intel(R) Xeon(R) ..., 2 threads"`` (CPU model name and ``threads``, by default torch's thread
    count), or the GPU's name."""
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "CPU"
    threads = torch.get_num_threads() if threads is None else threads
    return f"{name}, {threads} thread{'s' if threads != 1 else ''}"


def _speed_caption(rows: List[Dict[str, Any]]) -> str:
    r = rows[0]
    if "images_per_s" not in r:
        return "speed:    not measured (--speed-model none)"
    random = r["speed_weights"] == "random weights"
    return (f"speed:    {models.display_name(r['speed_model'])} {'architecture, ' if random else ''}{r['speed_weights']}"
            f"{' (its cost does not depend on them)' if random else ''}, batch {r['speed_batch_size']} on "
            f"{r['device']}; img/s: median [min-max] of {r['speed_runs']} interleaved runs")


def format_table(rows: List[Dict[str, Any]], model: str = models.REFERENCE) -> str:
    """The bench table: accuracy columns (evaluated model) | speed columns (timed model)."""
    has_speed = "images_per_s" in rows[0]
    left = f"{'method':<12}{'setting':<14}{'FLOPs':>7}{'top-1':>8}{'agree':>8}"
    right = f"{'GFLOPs':>8}{'FLOPs':>8}{'img/s':>8}{'[min-max]':>13}{'speedup':>9}{'ideal':>7}"
    group = " " * 26 + " accuracy ".center(len(left) - 26, "-")
    head = left
    if has_speed:
        name = models.display_name(rows[0]["speed_model"])
        if rows[0]["speed_weights"] == "random weights":
            name += " architecture, random weights"
        label = f" speed: {name} "
        group += "  | " + (label if len(label) <= len(right) else " speed ").center(len(right), "-")
        head += "  | " + right
    lines = [f"accuracy: {models.display_name(model)}, {rows[0].get('images', '?')} images; top-1 and agreement "
             "with the uncompressed model's top-1", _speed_caption(rows), "", group, head, "-" * len(head)]
    for r in rows:
        line = (f"{r['method']:<12}{r['setting']:<14}{100 * r['flops_ratio']:>6.1f}%{100 * r['top1']:>7.2f}%"
                f"{100 * r['agreement']:>7.1f}%")
        if has_speed:
            spread = f"[{r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f}]"
            line += (f"  | {r['speed_gflops']:>8.3f}{100 * r['speed_flops_ratio']:>7.1f}%{r['images_per_s']:>8.1f}"
                     f"{spread:>13}{r['speedup']:>8.2f}x{r['ideal_speedup']:>6.2f}x")
        lines.append(line)
    return "\n".join(lines)


_LABEL_OFFSETS = ((5, 5), (5, -11), (-5, 5), (-5, -11))  # budget labels of the methods, apart where points meet


def plot(rows: List[Dict[str, Any]], path: str, model: str = models.REFERENCE, title: Optional[str] = None) -> None:
    """Top-1 vs FLOPs (evaluated model), top-1 vs images/s and images/s vs FLOPs (timed model, medians
    with min-max error bars); budget labels on the points, one legend, model / hardware / date in the
    title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]
    has_speed = "images_per_s" in base
    methods = list(dict.fromkeys(r["method"] for r in rows[1:]))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 3 if has_speed else 1, figsize=(16, 5.2) if has_speed else (7, 5.2), squeeze=False)
    axes = axes[0]

    def curve(ax, x_of, y_of, xerr_of=None, yerr_of=None, label_points=True):
        for method in methods:
            runs = sorted((r for r in rows if r["method"] == method), key=lambda r: -r["flops_ratio"])
            pts = [base] + runs
            xs, ys = [x_of(r) for r in pts], [y_of(r) for r in pts]
            xerr = None if xerr_of is None else [[a for a, _ in map(xerr_of, pts)], [b for _, b in map(xerr_of, pts)]]
            yerr = None if yerr_of is None else [[a for a, _ in map(yerr_of, pts)], [b for _, b in map(yerr_of, pts)]]
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", ms=5, capsize=3, color=colors[method], label=method)
            if label_points:
                offset = _LABEL_OFFSETS[methods.index(method) % len(_LABEL_OFFSETS)]
                for r, x, y in zip(runs, xs[1:], ys[1:]):
                    ax.annotate(r["setting"], (x, y), textcoords="offset points", xytext=offset, fontsize=7,
                                color=colors[method], ha="left" if offset[0] >= 0 else "right")
        ax.errorbar([x_of(base)], [y_of(base)], marker="*", ms=14, color="black", ls="none", zorder=3,
                    label="uncompressed")
        ax.grid(alpha=0.3)

    acc_name = models.display_name(model)
    ax = axes[0]
    curve(ax, lambda r: 100 * r["flops_ratio"], lambda r: 100 * r["top1"])
    ax.set_xlabel(f"FLOPs, % of uncompressed ({acc_name})")
    ax.set_ylabel(f"top-1 accuracy, % ({acc_name})")
    ax.set_title("accuracy vs FLOPs", fontsize=10)
    if has_speed:
        speed_name = models.display_name(base["speed_model"])

        def spread(r):
            return (r["images_per_s"] - r.get("images_per_s_min", r["images_per_s"]),
                    r.get("images_per_s_max", r["images_per_s"]) - r["images_per_s"])

        ax = axes[1]
        curve(ax, lambda r: r["images_per_s"], lambda r: 100 * r["top1"], xerr_of=spread)
        ax.set_xlabel(f"images / s, {speed_name} (median, bars: min-max of runs)")
        ax.set_ylabel(f"top-1 accuracy, % ({acc_name})")
        ax.set_title("accuracy vs throughput", fontsize=10)
        ax = axes[2]
        curve(ax, lambda r: 100 * r["speed_flops_ratio"], lambda r: r["images_per_s"], yerr_of=spread)
        ratios = sorted({r["speed_flops_ratio"] for r in rows})
        ax.plot([100 * q for q in ratios], [base["images_per_s"] / q for q in ratios], ls="--", color="grey", lw=1,
                label="ideal (uncompressed img/s / FLOPs ratio)")
        ax.set_xlabel(f"FLOPs, % of uncompressed ({speed_name})")
        ax.set_ylabel(f"images / s, {speed_name}, batch {base['speed_batch_size']}")
        ax.set_title("throughput vs FLOPs", fontsize=10)
    if title is None:
        where = hardware(base["device"], base.get("threads")) if has_speed else hardware("cpu")
        what = f"accuracy: {acc_name}"
        if has_speed:
            weights = base["speed_weights"]
            what += f"  |  speed: {speed_name} ({'architecture, ' if weights == 'random weights' else ''}{weights})"
        title = f"vitcompress bench -- {what}\n{where}  |  {datetime.date.today().isoformat()}"
    fig.suptitle(title, fontsize=10)
    handles, labels = axes[-1].get_legend_handles_labels()
    seen = dict(zip(labels, handles))
    for h, lab in zip(*axes[0].get_legend_handles_labels()):
        seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=len(seen), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
