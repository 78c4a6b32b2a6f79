"""FLOPs (fvcore, with the ops it would miss) and speed (throughput, latency, memory)."""
from .flops import count_flops
from .speed import compare_speed, measure_speed

__all__ = ["count_flops", "measure_speed", "compare_speed"]
