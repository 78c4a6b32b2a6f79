"""vitcompress: training-free token reduction for pretrained transformers, in one line.

The names below are imported on first use, so ``import vitcompress.kernels`` (or any other
submodule) does not pull in the adapters and their model libraries.
"""
import importlib

__version__ = "0.3.0.dev0"

_EXPORTS = {
    "compress": "api", "restore": "api", "stats": "api", "list_methods": "api", "describe": "api",
    "count_flops": "profile", "measure_speed": "profile", "compare_speed": "profile",
    "export_onnx": "export", "export_program": "export", "export_executorch": "export",
    "supported": "support", "tune": "tuning",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # submodules as attributes: vitcompress.methods.zero_tprune, vitcompress.adapters, ...
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'vitcompress' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
