"""Under what conditions a speed figure was measured, and whether the machine was too busy to time.

A speedup timed while other processes load the CPU can be anything: on a busy 2-core machine
``vitcompress bench`` once printed 0.49x-0.93x where an idle run gives 1.18x-1.78x. Every figure
the library prints goes with :func:`describe_conditions` (device, dtype, batch, threads, attention
backend, load), and :func:`busy_warning` says when the repeated runs or the load average show that
the figures are not to be trusted.
"""
import os
import statistics
from typing import Any, Dict, Iterable, Optional, Sequence

import torch

#: Interquartile range of the repeated runs over their median above which timings are called noisy.
MAX_SPREAD = 0.10


def attention_backend(device) -> str:
    """Which fused-attention kernels ``scaled_dot_product_attention`` may use on ``device``."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"SDPA ({device.type} kernels)"
    enabled = [name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                     ("mem-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                     ("cudnn", getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: False)()),
                                     ("math", torch.backends.cuda.math_sdp_enabled())) if on]
    return f"SDPA ({', '.join(enabled) or 'none enabled'})"


def device_name(device) -> str:
    """``"cuda:0 (NVIDIA H100 80GB HBM3)"`` or ``"cpu (Intel(R) Xeon(R) ...)"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name")), "")
    except OSError:
        pass
    return f"{device} ({name})" if name else str(device)


def _load() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Windows
        return None


def timing_conditions(device, dtype, batch_size: int) -> Dict[str, Any]:
    """Device, dtype, batch, threads, attention backend, CPU cores and the 1-minute load average now."""
    return {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""), "batch_size": int(batch_size),
            "threads": torch.get_num_threads(), "attention": attention_backend(device), "cores": os.cpu_count(),
            "load": _load()}


def describe_conditions(conditions: Dict[str, Any]) -> str:
    """One line: ``cpu (...), float32, batch 16, 2 threads, SDPA (cpu kernels), load 1.9 on 2 cores``."""
    c = conditions
    load = "" if c.get("load") is None else f", load {c['load']:.1f} on {c['cores']} cores"
    return f"{c['device']}, {c['dtype']}, batch {c['batch_size']}, {c['threads']} threads, {c['attention']}{load}"


def relative_spread(values: Sequence[float]) -> float:
    """Interquartile range over the median of repeated measurements (0 for fewer than 2)."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(values)


def busy_warning(runs: Iterable[Sequence[float]], conditions: Dict[str, Any],
                 max_spread: float = MAX_SPREAD) -> Optional[str]:
    """A warning when the machine was too busy to time, else None.

    ``runs``: each timed model's repeated measurements (e.g. images/s per run). Busy means the
    typical model's runs spread by more than ``max_spread`` (interquartile range / median), or, on
    a CPU, a load average above what the measurement's own threads explain by a quarter of the
    cores (at least 0.5): other processes compete for the cores.
    """
    spreads = [relative_spread(list(v)) for v in runs]
    spread = statistics.median(spreads) if spreads else 0.0
    reasons = []
    load, cores, threads = conditions.get("load"), conditions.get("cores") or 1, conditions.get("threads") or 1
    if load is not None and not conditions["device"].startswith("cuda"):
        if load - min(threads, cores) > max(0.5, 0.25 * cores):
            reasons.append(f"load average {load:.1f} on {cores} cores while timing with {threads} threads")
    if spread > max_spread:
        reasons.append(f"repeated runs vary by {100 * spread:.0f}% (interquartile range / median)")
    if not reasons:
        return None
    return ("timings not reliable, the machine is busy: " + "; ".join(reasons) +
            ". Rerun on an idle machine before trusting speedups")


__all__ = ["MAX_SPREAD", "attention_backend", "device_name", "timing_conditions", "describe_conditions",
           "relative_spread", "busy_warning"]
