"""Parsing of ``method:budget`` settings as used on the command line (``pitome:keep=0.9``)."""
import ast
from typing import Any, Dict, List, Tuple

BUDGET_KEYS = ("keep", "r", "flops")


def parse_setting(text: str) -> Tuple[str, Dict[str, Any]]:
    """``"tome:r=8"`` -> ``("tome", {"r": 8})``; options after commas: ``"pitome:keep=0.9,margin=0.5"``."""
    method, _, rest = text.partition(":")
    kwargs: Dict[str, Any] = {}
    for item in filter(None, _split_top_level(rest)):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"setting {text!r}: expected key=value after the method, e.g. tome:r=8")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return method.strip(), kwargs


def _split_top_level(text: str) -> List[str]:
    """Split at the commas outside brackets, so list and tuple values stay whole (``iters=[30,5,1]``)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def describe(kwargs: Dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items()) or "default"
