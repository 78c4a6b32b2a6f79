"""What export refuses before any work: a method it cannot export, an input shape or an output path
it cannot use, a missing extra. The ``vitcompress export`` command asks the same questions
(:func:`check_exportable_method`) before it builds a model."""
import os
from typing import List, Sequence, Tuple

import torch.nn as nn

from ..interfaces import runtime_of


def static_methods() -> List[str]:
    """The ViT methods whose token schedule is static for an input size: the ones export takes."""
    from ..methods import get, names

    return [n for n in names("vit") if not getattr(get(n), "dynamic", False)]


def check_exportable_method(method) -> None:
    """Raise ``ValueError`` for a method export cannot take: one for detectors or VLMs, or one whose
    token counts depend on the content, whose graph would bake in the token counts of the example
    input and silently give wrong results on other images."""
    if method.target != "vit":
        raise ValueError(f"cannot export a model compressed with {method.name!r}: export covers ViT-like image "
                         f"models (timm, CLIP image towers) compressed with {', '.join(static_methods())}; "
                         "export a detector or a LLaVA uncompressed")
    if getattr(method, "dynamic", False):
        raise ValueError(
            f"cannot export a model compressed with {method.name!r}: that method sets the number of "
            "tokens each block keeps from the content of the image, so there is no static token "
            "schedule; an exported graph would fix the counts of the example input and compute "
            "wrong results for other images. Export it uncompressed, or compress it with a method "
            "with a static schedule (" + ", ".join(static_methods()) + ").")


def check_exportable(model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model`` is compressed with a method export cannot take
    (:func:`check_exportable_method`); an uncompressed model always exports."""
    runtime = runtime_of(model)
    if runtime is not None:
        check_exportable_method(runtime.method)


def checked_input_shape(input_shape: Sequence[int]) -> Tuple[int, ...]:
    """``input_shape`` as a tuple of ints, refused unless it is ``(batch, channels, height, width)``."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape={tuple(input_shape)!r}: give (batch, channels, height, width), "
                         "e.g. (1, 3, 224, 224)")
    return shape


def check_output_path(path: str) -> None:
    """Fail before the (slow) export when ``path`` cannot be written."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ValueError(f"{path} is a directory: give the .onnx file to write, e.g. {os.path.join(path, 'model.onnx')}")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):  # as the CLI: a missing folder is more often a typo than a wish
        raise ValueError(f"{path}: folder {folder} does not exist; create it first (mkdir -p {folder}) or "
                         "choose another path")
    existed = os.path.exists(target)
    try:
        with open(target, "ab"):
            pass
    except OSError as err:
        raise ValueError(f"cannot write {path}: {err.strerror or err}") from None
    if not existed:
        os.remove(target)


def require(module: str):
    """``module`` imported, or an ``ImportError`` naming the extra that installs it."""
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"ONNX export needs {module}: pip install 'vitcompress[export]' "
                          "(onnx, onnxruntime, onnxscript)") from err
