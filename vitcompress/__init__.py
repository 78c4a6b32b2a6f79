"""vitcompress: training-free token reduction for pretrained transformers, in one line."""
from .api import compress, methods, restore, stats
from .export import export_onnx, export_program
from .profile import compare_speed, count_flops, measure_speed

__version__ = "0.1.0"
__all__ = ["compress", "restore", "methods", "stats", "count_flops", "measure_speed", "compare_speed",
           "export_onnx", "export_program",
           "__version__"]
