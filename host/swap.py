"""Replace a named submodule of a model by a student, in place or on a copy.

The user's model is never modified unless they call the in-place :func:`swap_`; :func:`swapped`
works on a deep copy, so the teacher stays available for comparison.
"""

from __future__ import annotations

import copy

from torch import nn

from convexedge.device.errors import DataError

__all__ = ["swap_", "swapped"]


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    names = dict(model.named_modules())
    if not name or name not in names:
        raise DataError(
            f"module {name!r} not found in the model; top-level modules are "
            f"{[n for n in names if n and '.' not in n]}"
        )
    parent_name, _, attr = name.rpartition(".")
    return names[parent_name], attr


def swap_(model: nn.Module, name: str, student: nn.Module) -> nn.Module:
    """Put ``student`` where ``model.<name>`` was, in place; returns the module it replaced.

    Example:
        >>> old = swap_(model, "layer3", student)   # doctest: +SKIP
    """
    parent, attr = _parent_and_attr(model, name)
    old = getattr(parent, attr)
    setattr(parent, attr, student)  # Module.__setattr__ fills _modules[attr]: Sequential/ModuleList too
    return old


def swapped(model: nn.Module, name: str, student: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with ``model.<name>`` replaced by ``student`` (``model`` unchanged)."""
    _parent_and_attr(model, name)  # validate before paying for the copy
    out = copy.deepcopy(model)
    swap_(out, name, student)
    return out
