"""argparse value types shared by the scripts: each wraps a library check and rejects a bad value with
a message naming it (argparse adds the flag and exits 2)."""
from __future__ import annotations

import argparse
import math

from sparq_jax.methods import METHOD_NAMES
from sparq_jax.validation import check_int, check_number, parse_ratio


def _argparse(check):
    """An argparse type from a library check that raises ValueError."""
    def parse(text: str):
        try:
            return check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = parse.__qualname__ = check.__name__
    return parse


def _number(text: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        return text                   # not a number: the check names it


@_argparse
def positive_int(text: str) -> int:
    return check_int("the value", _number(text, int), 1)


@_argparse
def positive_float(text: str) -> float:
    return check_number("the value", _number(text), 0.0, math.inf)


@_argparse
def int_list(text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. 1024,4096."""
    items = [x for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"expected a comma-separated list of positive integers, got {text!r}")
    return [check_int("each value", _number(x, int), 1) for x in items]


@_argparse
def ratio(text: str) -> float:
    """A transfer ratio in (0, 1], written 0.125 or 1/8 (sparq_jax.validation.parse_ratio)."""
    return parse_ratio(text, "the ratio")


@_argparse
def ratio_list(text: str) -> list[float]:
    """A comma-separated list of ratios, e.g. 1/2,1/4,0.125."""
    return [parse_ratio(item, "each ratio") for item in text.split(",")]


def names_list(choices, what: str):
    """An argparse type: a comma-separated list of some of `choices` (`what`: one of them, e.g. "method")."""
    def parse(text: str) -> list[str]:
        items = [x.strip().lower() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, bad))}; choose from {', '.join(choices)}")
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma list of {what}s from {', '.join(choices)}; got {text!r}")
        return items
    parse.__name__ = f"{what}_list"
    return parse


def unique(items, default) -> list:
    """The items of an action="extend" flag, repeats dropped (order kept); `default` if none were given."""
    return list(dict.fromkeys(items)) if items else list(default)


# The one method-list flag of every script: --methods dense,sparq,h2o, comma-separated or repeated
# (--method is the same flag): type=method_list, action="extend", then unique(args.methods, default).
method_list = names_list(METHOD_NAMES, "method")


def _path(image: bool):
    def check(text: str) -> str:
        from .evaluation.results import check_output_path
        return check_output_path(text, "the path", image=image)
    check.__name__ = "image_file" if image else "output_file"
    return _argparse(check)


# A file to write: its folder exists and it is not a folder (image_file: and matplotlib writes its extension).
output_file, image_file = _path(False), _path(True)
