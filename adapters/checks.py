"""The small value checks that configs and pipelines share: a leaf module, importing nothing of the project.

A bool is never a number here, although Python counts True as the int 1."""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any, minimum: int | None = None) -> bool:
    """Whether `value` is a real int (not a bool), and >= `minimum` when one is given."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return minimum is None or value >= minimum


def is_number(value: Any, minimum: float | None = None, *, inclusive: bool = True,
              maximum: float | None = None) -> bool:
    """Whether `value` is a finite int or float (not a bool), >= `minimum` (> with inclusive=False) when one
    is given, and <= `maximum` when one is given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if minimum is not None and not (value >= minimum if inclusive else value > minimum):
        return False
    return maximum is None or value <= maximum
