"""vitcompress: training-free token reduction for pretrained transformers, in one line."""
from .api import compress, methods, restore, stats

__version__ = "0.1.0"
__all__ = ["compress", "restore", "methods", "stats", "__version__"]
