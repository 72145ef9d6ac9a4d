"""The argument checks the packages share, each with a message naming the argument and its value: an
integer in range, a finite number in range, and a transfer ratio (the one ratio parser)."""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Optional

import numpy as np


def check_int(name: str, value, minimum: Optional[int] = 1, error: type = ValueError,
              maximum: Optional[int] = None) -> int:
    """int(value) if value is an integer (not a bool) in [minimum, maximum] (None: unbounded), else
    `error` naming the argument and value."""
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
            or (minimum is not None and value < minimum) or (maximum is not None and value > maximum)):
        if maximum is not None:
            what = f"an integer in [{minimum}, {maximum}]"
        elif minimum is None:
            what = "an integer"
        else:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_number(name: str, value, low: float, high: float = math.inf, *, low_open: bool = True,
                 error: type = ValueError) -> float:
    """float(value) if value is a finite real number (Python or NumPy, not a bool) in (low, high]
    ([low, high] with low_open=False), else `error` naming the argument and value."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if ok:
        x = float(value)
        ok = math.isfinite(x) and (x > low if low_open else x >= low) and x <= high
    if not ok:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
        raise error(f"{name} must be a finite number in {span}, got {value!r}")
    return x


def parse_ratio(value, name: str = "ratio") -> float:
    """A transfer ratio M_method / M_dense in (0, 1] as a float, from a number (Python or NumPy), a
    Fraction or a string such as "0.125" or "1/8". ValueError naming `name` and the value otherwise."""
    if isinstance(value, str):
        try:
            parsed = Fraction(value.strip())
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{name} must be a number in (0, 1] such as 0.125 or 1/8, got {value!r}") from None
        if not 0 < parsed <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        return float(parsed)
    return check_number(name, value, 0.0, 1.0)
