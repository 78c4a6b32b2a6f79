"""The arguments of the ``vitcompress`` commands and their checks, for any script that takes the
same arguments: a bad one is refused before any model is built, in one line naming the fix (argparse
``type`` functions raise ``ArgumentTypeError``, the checks ``ValueError`` / ``TypeError``)."""
import argparse
import os
from typing import Any, Dict, Optional, Sequence

from .settings import BUDGET_KEYS


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with errors on one line and exit code 2: ``vitcompress bench: error: ...``."""

    def error(self, message: str):
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(text: str, kind: type, fix: str):
    """``text`` as an int or a float, or the argparse error ``'x' is not a number; <fix>``."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}; "
                                         f"{fix}") from None


def int_at_least(minimum: int, example: str):
    """An argparse ``type``: an int >= ``minimum``; the errors name ``example``."""
    def parse(text: str) -> int:
        value = _number(text, int, f"give e.g. {example}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}; give e.g. {example}")
        return value
    parse.__name__ = "int"
    return parse


def fraction(text: str) -> float:
    """A fraction in (0, 1] (keep= / flops= budgets)."""
    value = _number(text, float, "give a fraction in (0, 1], e.g. 0.7")
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is outside (0, 1]: it is a fraction of the uncompressed "
                                         "model, e.g. 0.7")
    return value


def non_negative_float(text: str) -> float:
    """A number >= 0 (a tolerance)."""
    value = _number(text, float, "give e.g. 1e-4")
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}; give e.g. 1e-4")
    return value


def check_output_file(path: str, extensions: Sequence[str]) -> str:
    """Refuse, before any work, an output file that could not be written: an unknown extension, a
    missing or read-only folder, a folder given as the file. Creates nothing. Returns ``path``."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise ValueError(f"{path} is a folder; give the file to write, e.g. "
                         f"{os.path.join(path, 'out' + extensions[0])}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in extensions:
        raise ValueError(f"{path}: unknown file type {ext or '(no extension)'!r}; give a file ending in "
                         f"{' / '.join(extensions)}")
    folder = os.path.dirname(target)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{path}: {folder} is a file, not a folder; choose another path")
    if not os.path.isdir(folder):
        raise ValueError(f"{path}: folder {folder} does not exist; create it first (mkdir -p {folder}) or "
                         "choose another path")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise ValueError(f"{path}: not writable here; choose a path in a folder you can write to")
    return path


def output_file(*extensions: str):
    """An argparse ``type``: the path of a file to write, checked by :func:`check_output_file`."""
    def parse(text: str) -> str:
        try:
            return check_output_file(text, extensions)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = "path"
    return parse


def check_device(text: Optional[str]) -> str:
    """The device to run on: ``cuda`` when available, else ``cpu``, for ``None``; an unavailable or
    unknown device raises ``ValueError`` naming the fix."""
    import torch

    if text is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a device; give cpu or cuda (cuda:1 for the second GPU)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {text}: CUDA is not available ({why}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {text}: only {torch.cuda.device_count()} GPU(s) visible; use cuda:0")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {text}: MPS is not available; use --device cpu")
    elif device.type != "cpu":
        raise ValueError(f"--device {text}: use cpu, cuda (cuda:N) or mps")
    return text


def parse_budget_text(text: Optional[str], name: str = "--r"):
    """``"8"`` / ``"[8,8,4]"`` / ``"(8,-0.5)"`` -> the Python value; ``ValueError`` naming the forms."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"{name} {text!r}: give an int, a list like [8,8,4] or a tuple like (8,-0.5)") from None


def budget_arguments(args) -> Dict[str, Any]:
    """The budget given as ``--keep`` / ``--r`` / ``--flops`` (at most one: a mutually exclusive group) as
    ``compress`` takes it, ``--r`` parsed; ``{}`` when none is given."""
    budget = {k: getattr(args, k) for k in ("keep", "r", "flops") if getattr(args, k) is not None}
    if "r" in budget:
        budget["r"] = parse_budget_text(budget["r"])
    return budget


#: what each method target reduces, for the message naming a method of another target
TARGET_MODELS = {"vit": "ViT-like image encoders", "detr": "DETR detectors", "llava": "LLaVA models"}


def check_setting(method: str, kwargs: Dict[str, Any], exportable: bool = False, target: str = "vit") -> None:
    """Check a method name (one for ``target`` models), its options and its budget without a model,
    and with ``exportable`` that export takes the method; ``ValueError`` / ``TypeError`` naming the fix."""
    from .. import api
    from ..engine.schedule import parse_budget
    from ..methods import get

    spec = get(method)
    if spec.target != target:
        raise ValueError(f"{method} reduces {spec.target} models; this command runs the methods for "
                         f"{TARGET_MODELS[target]}: {', '.join(api.list_methods(target))}")
    if exportable:
        from ..export import check_exportable_method

        check_exportable_method(spec)
    budget = {k: kwargs[k] for k in BUDGET_KEYS if k in kwargs}
    options = {k: v for k, v in kwargs.items() if k not in BUDGET_KEYS}
    parse_budget(spec, **budget)
    api.resolve_options(spec, options)  # unknown options and bad values, as compress() checks them
