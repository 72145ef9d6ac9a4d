"""The one argument check the packages share: an integer at least `minimum`, with a message naming it."""
from __future__ import annotations

import numpy as np


def check_int(name: str, value, minimum: int = 1, error: type = ValueError) -> int:
    """int(value) if value is an integer (not a bool) >= minimum, else `error` naming the argument and value."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"{name} must be {what}, got {value!r}")
    return int(value)
