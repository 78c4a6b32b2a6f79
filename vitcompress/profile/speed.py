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


class CUDAGraphed:
    """``model`` on inputs shaped like ``example``, captured once as a CUDA graph and replayed.

    A compressed model's token counts are static, so its whole forward can be captured; replaying
    it times the GPU work without Python's per-op launch cost, which dominates small models in
    eager mode (the way to deploy them fast, e.g. ``torch.compile(mode="reduce-overhead")``).
    """

    def __init__(self, model, example: torch.Tensor, warmup: int = 3):
        self.static_input = example.clone()
        side = torch.cuda.Stream(example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):
                model(self.static_input)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.static_output = model(self.static_input)

    def __call__(self, inputs: torch.Tensor):
        self.static_input.copy_(inputs)
        self.graph.replay()
        return self.static_output


def compare_speed(models: Mapping[str, torch.nn.Module], inputs: torch.Tensor, *, warmup: int = 2,
                  runs: int = 7, latency: bool = True, memory: bool = True,
                  cuda_graph: bool = False) -> Dict[str, Dict[str, Any]]:
    """Measure several models in one interleaved run, so machine noise hits them alike.

    Every round times each model once (rotating who goes first); throughput is images/s from the
    median round, ``latency_ms`` the median batch-1 forward, ``peak_memory`` in bytes.
    ``cuda_graph=True`` (CUDA inputs) times replays of captured graphs (:class:`CUDAGraphed`).
    """
    batch = inputs.shape[0]
    names = list(models)
    if cuda_graph:
        if inputs.device.type != "cuda":
            raise ValueError("compare_speed(cuda_graph=True) needs CUDA inputs")
        eager = dict(models)
        models = {n: CUDAGraphed(m, inputs) for n, m in eager.items()}
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
            single = CUDAGraphed(eager[name], one) if cuda_graph else models[name]
            for _ in range(warmup):
                _run(single, one)
            row["latency_ms"] = 1000 * statistics.median(_timed(single, one) for _ in range(max(3, runs)))
        if memory:
            row["peak_memory"] = peak_memory(eager[name] if cuda_graph else models[name], inputs)
        result[name] = row
    return result


def measure_speed(model: torch.nn.Module, inputs: torch.Tensor, *, warmup: int = 2, runs: int = 7) -> Dict[str, Any]:
    """``throughput`` (images/s, median over ``runs``), ``latency_ms`` at batch 1, ``peak_memory`` (bytes)."""
    return compare_speed({"model": model}, inputs, warmup=warmup, runs=runs)["model"]
