"""Throughput, latency and peak memory, measured the same way for every model compared."""
import os
import statistics
import threading
import time
from typing import Any, Dict, List, Mapping

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(model, inputs) -> None:
    with torch.inference_mode():
        model(inputs)


def _timed(model, inputs) -> float:
    device = inputs.device
    _sync(device)
    start = time.perf_counter()
    _run(model, inputs)
    _sync(device)
    return time.perf_counter() - start


class _PeakRSS:
    """Peak growth of the process's resident memory while the block runs (CPU), by sampling."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @property
    def growth(self) -> int:
        return self.peak - self.base


def peak_memory(model, inputs) -> int:
    """Bytes of memory one forward needs beyond what is already allocated: CUDA's peak allocation
    on GPU; on CPU the peak growth of resident memory (sampled, so approximate)."""
    device = inputs.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _run(model, inputs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not os.path.exists("/proc/self/statm"):
        return -1
    with _PeakRSS() as rss:
        _run(model, inputs)
    return rss.growth


def compare_speed(models: Mapping[str, torch.nn.Module], inputs: torch.Tensor, *, warmup: int = 2,
                  runs: int = 7, latency: bool = True, memory: bool = True) -> Dict[str, Dict[str, Any]]:
    """Measure several models in one interleaved run, so machine noise hits them alike.

    Every round times each model once (rotating who goes first); throughput is images/s from the
    median round, ``latency_ms`` the median batch-1 forward, ``peak_memory`` in bytes.
    """
    batch = inputs.shape[0]
    names = list(models)
    for _ in range(warmup):
        for name in names:
            _run(models[name], inputs)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for i in range(runs):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            times[name].append(_timed(models[name], inputs))
    result = {}
    one = inputs[:1]
    for name in names:
        row = {"throughput": batch / statistics.median(times[name]), "batch_size": batch,
               "runs": runs, "seconds": times[name]}
        if latency:
            for _ in range(warmup):
                _run(models[name], one)
            row["latency_ms"] = 1000 * statistics.median(_timed(models[name], one) for _ in range(max(3, runs)))
        if memory:
            row["peak_memory"] = peak_memory(models[name], inputs)
        result[name] = row
    return result


def measure_speed(model: torch.nn.Module, inputs: torch.Tensor, *, warmup: int = 2, runs: int = 7) -> Dict[str, Any]:
    """``throughput`` (images/s, median over ``runs``), ``latency_ms`` at batch 1, ``peak_memory`` (bytes)."""
    return compare_speed({"model": model}, inputs, warmup=warmup, runs=runs)["model"]
