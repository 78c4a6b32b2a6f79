"""Undoable model surgery (:class:`Patcher`) and per-thread values (:class:`PerThread`): what every
runtime uses to patch a model and to keep the state of a forward apart from other threads'."""
import threading
from typing import Any


class Patcher:
    """Sets attributes on modules and registers hooks through their public handles, and remembers
    how to put every one of them back exactly (hooks the user registered are left alone)."""

    def __init__(self):
        self._undo = []

    def set(self, obj, name: str, value) -> None:
        had = name in obj.__dict__
        self._undo.append(("attr", obj, name, had, obj.__dict__.get(name)))
        object.__setattr__(obj, name, value)

    def hook(self, handle) -> None:
        """Remember a hook's ``RemovableHandle`` (from ``register_forward_pre_hook`` etc.)."""
        self._undo.append(("hook", handle))

    def undo(self) -> None:
        for entry in reversed(self._undo):
            if entry[0] == "hook":
                entry[1].remove()
                continue
            _, obj, name, had, old = entry
            if had:
                object.__setattr__(obj, name, old)
            else:
                del obj.__dict__[name]
        self._undo.clear()


class PerThread:
    """A value per thread (``threading.local``) that survives ``copy.deepcopy`` and pickling of the
    object holding it: a copy starts with no value in any thread."""

    def __init__(self):
        self._local = threading.local()

    def get(self) -> Any:
        return getattr(self._local, "value", None)

    def set(self, value: Any) -> None:
        self._local.value = value

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._local = threading.local()
