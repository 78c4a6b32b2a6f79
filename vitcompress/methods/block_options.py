"""What several ViT methods check alike: the ``layers`` option (which blocks reduce) and the class
token a method scores with."""
from typing import List, Sequence


def is_int(v) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def quarter_layers(num_layers: int) -> List[int]:
    """Blocks ``L//4, L//2, 3L//4`` (3, 6, 9 of 12): where EViT and PPT reduce by default."""
    return sorted({k * num_layers // 4 for k in (1, 2, 3)})


def check_layers(method: str, layers, none_means: str, allow_empty: bool = True) -> None:
    """Refuse a ``layers`` option that is neither None nor a list of block indices (``none_means``:
    what None does, for the message)."""
    if layers is None:
        return
    if (not isinstance(layers, (list, tuple)) or (not allow_empty and not layers)
            or not all(is_int(v) and v >= 0 for v in layers)):
        raise ValueError(f"{method} layers={layers!r}: give None ({none_means}) or a list of block indices")


def check_layers_fit(method: str, layers: Sequence[int], num_layers: int) -> None:
    """Refuse block indices a model of ``num_layers`` blocks does not have."""
    if any(v >= num_layers for v in layers):
        raise ValueError(f"{method} layers={list(layers)}: the model has blocks 0..{num_layers - 1}")


# the ViT methods that work without a class token (tests/test_support.py checks this against the registry)
CLASS_TOKEN_FREE = ("tome", "pitome", "zero_tprune", "mctf", "tofu", "atc")


def check_class_token(method: str, reads: str, num_prefix: int, cls_first: bool) -> None:
    """Refuse, at compress time, a model without a class token for a method that ``reads`` it."""
    if num_prefix == 0 or not cls_first:
        raise ValueError(f"{method} {reads} and this model has no class token; use a method that needs none: "
                         f"{', '.join(CLASS_TOKEN_FREE)}")
