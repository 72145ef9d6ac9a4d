"""argparse value types shared by the scripts (and the lm-eval backend's model_args): each rejects a
bad value with a message naming it."""
from __future__ import annotations

import argparse
import math
from fractions import Fraction

from sparq_jax.validation import check_int


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = text
    return check_int("the value", value, 1, argparse.ArgumentTypeError)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. 1024,4096."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


def ratio(text: str) -> float:
    """A transfer ratio in (0, 1], written 0.125 or 1/8."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"--compression must be a number like 0.125 or 1/8, got {text!r}")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"--compression values must be in (0, 1], got {text!r}")
    return value


def ratio_list(text: str) -> list[float]:
    """A comma-separated list of ratios, e.g. 1/2,1/4,0.125."""
    return [ratio(item) for item in text.split(",")]
