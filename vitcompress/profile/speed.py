"""Throughput, latency and peak memory, measured the same way for every model compared."""
import statistics
import time
import weakref
from typing import Any, Callable, Dict, Iterable, List, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .conditions import busy_warning, timing_conditions


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


class _PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage that the ops run under it allocate and hold at the same time.

    The CPU allocator keeps no statistics, and resident memory does not shrink when tensors are
    freed, so on a CPU the forward's tensors are followed one by one: an op's output on a storage
    not seen before adds its bytes, which come off when the last tensor on it is gone. Storages of
    ``external`` tensors (weights, inputs) are never counted; buffers an op uses inside (e.g.
    fused attention's workspace) are not seen.
    """

    def __init__(self, external=()):
        super().__init__()
        self.live = self.peak = 0
        self._refs: Dict[int, List[int]] = {}  # storage address -> [tensors on it, bytes]
        self._external = {t.untyped_storage().data_ptr() for t in external}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        address, size = storage.data_ptr(), storage.nbytes()
        if address == 0 or size == 0 or address in self._external:
            return
        entry = self._refs.get(address)
        if entry is None:
            entry = self._refs[address] = [0, size]
            self.live += size
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, address)

    def _release(self, address: int) -> None:
        entry = self._refs.get(address)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                del self._refs[address]
                self.live -= entry[1]


def peak_memory(model, inputs) -> int:
    """Bytes of memory one forward needs beyond what is already allocated: CUDA's peak allocation
    on GPU; on CPU the peak of the forward's tensors alive at once (:class:`_PeakTensorBytes`)."""
    device = inputs.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _run(model, inputs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    external = [inputs]
    if isinstance(model, torch.nn.Module):
        external += list(model.parameters()) + list(model.buffers())
    return peak_tensor_memory(lambda: _run(model, inputs), external)


def peak_tensor_memory(call: Callable[[], Any], external: Iterable[torch.Tensor] = ()) -> int:
    """Peak bytes of the tensors ``call()`` allocates and holds at the same time, on any device
    (:class:`_PeakTensorBytes`; ``external``: weights and inputs, never counted). For calls that
    :func:`peak_memory` cannot make, e.g. a VLM's forward on a dict of inputs."""
    tracker = _PeakTensorBytes(external)
    with tracker:
        call()
    return tracker.peak


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


def _quartiles(values: List[float]):
    """First and third quartiles (inclusive method: within the values' range, exact for 1 value)."""
    if len(values) == 1:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def _dtype(model, inputs: torch.Tensor) -> torch.dtype:
    """The dtype the forward computes in: autocast's when it is on, else the model's (or the inputs')."""
    if torch.is_autocast_enabled(inputs.device.type):
        return torch.get_autocast_dtype(inputs.device.type)
    parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return parameter.dtype if parameter is not None else inputs.dtype


def compare_speed(models: Mapping[str, torch.nn.Module], inputs: torch.Tensor, *, warmup: int = 2,
                  runs: int = 7, latency: bool = True, memory: bool = True,
                  cuda_graph: bool = False) -> Dict[str, Dict[str, Any]]:
    """Measure several models in one interleaved run, so machine noise hits them alike.

    Every round times each model once (rotating who goes first); ``throughput`` is images/s from
    the median round, with the spread of the rounds in ``throughput_runs`` (one value per round),
    ``throughput_min`` / ``throughput_max`` and ``throughput_q1`` / ``throughput_q3`` (quartiles;
    error bars); ``latency_ms`` the median batch-1 forward, ``peak_memory`` in bytes.
    ``cuda_graph=True`` (CUDA inputs) times replays of captured graphs (:class:`CUDAGraphed`).
    Every row also says how it was measured, ``conditions`` (device, dtype, batch, threads, attention
    backend, load: :func:`~vitcompress.profile.conditions.timing_conditions`), and ``timing_warning``:
    None, or why the machine was too busy for the figures to be trusted
    (:func:`~vitcompress.profile.conditions.busy_warning`).
    """
    if runs < 1:
        raise ValueError(f"compare_speed: runs={runs}, give at least 1 timed run (5 or more for a spread)")
    batch = inputs.shape[0]
    names = list(models)
    dtype = _dtype(models[names[0]], inputs) if names else inputs.dtype
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
    conditions = timing_conditions(inputs.device, dtype, batch)
    warning = busy_warning([[batch / t for t in times[n]] for n in names], conditions)
    result = {}
    one = inputs[:1]
    for name in names:
        per_run = [batch / t for t in times[name]]
        q1, q3 = _quartiles(per_run)
        row = {"throughput": batch / statistics.median(times[name]), "throughput_min": min(per_run),
               "throughput_max": max(per_run), "throughput_q1": q1, "throughput_q3": q3,
               "throughput_runs": per_run, "batch_size": batch, "runs": runs, "seconds": times[name],
               "conditions": conditions, "timing_warning": warning}
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
