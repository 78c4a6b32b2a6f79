"""vitcompress: training-free token reduction for pretrained transformers, in one line."""
from .api import compress, methods, restore, stats
from .profile import compare_speed, count_flops, measure_speed

__version__ = "0.1.0"
__all__ = ["compress", "restore", "methods", "stats", "count_flops", "measure_speed", "compare_speed",
           "__version__"]
