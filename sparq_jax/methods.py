"""Attention methods: frozen, hashable configs (static under jit) with exact transfer accounting.

`transfers(seq_len, head_dim)` counts the elements one decode step reads per KV head, as in the
paper ("Data transfer model"); budgets that exceed the sequence count min(top_k, seq_len).
`for_compression(ratio, head_dim, seq_len)` picks a budget whose transfer ratio M_method / M_dense is
as close to `ratio` as the method allows, and never more than 1% above it.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .validation import check_int, parse_ratio

# A budget may overshoot the requested ratio by this factor at most.
_TOLERANCE = 1.01
# What SparQ's step 2 may rank positions by when query heads share a KV head (SparQ.group_scores).
GROUP_SCORES = ("softmax", "logits")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, np.integer):       # frozen configs hold Python ints (hashable, static under jit)
        raise ValueError(f"{name} must be a Python int, got {value!r} ({type(value).__name__})")
    check_int(name, value, minimum)


def _check_shape_args(head_dim, seq_len) -> None:
    _check_int("head_dim", head_dim, 1)
    _check_int("seq_len", seq_len, 1)


def _closest(method_of, largest: int, ratio: float, seq_len: int, head_dim: int):
    """Of the budgets `largest` and `largest - 1` (both within the tolerance), the one whose ratio is
    nearer `ratio`."""
    dense = dense_transfers(seq_len, head_dim)
    options = [method_of(n) for n in (largest, largest - 1) if n >= 1]
    return min(options, key=lambda m: abs(m.transfers(seq_len, head_dim) / dense - ratio))


def dense_transfers(seq_len: int, head_dim: int) -> int:
    """Eq. 3: read all of K and V, plus q and the output."""
    return 2 * seq_len * head_dim + 2 * head_dim


def transfer_totals(method, seq_lens, head_dim: int) -> tuple[int, int]:
    """(method's, dense attention's) elements read per KV head, summed over decode steps at the cache
    lengths seq_lens (one per row and step): their ratio is a run's measured transfer ratio."""
    seq_lens = [int(n) for n in seq_lens]
    return (sum(method.transfers(n, head_dim) for n in seq_lens),
            sum(dense_transfers(n, head_dim) for n in seq_lens))


@dataclasses.dataclass(frozen=True)
class Dense:
    """Exact attention over every valid position: the reference and the baseline."""

    reads_transposed_keys = False
    stateful = False

    def transfers(self, seq_len: int, head_dim: int) -> int:
        return dense_transfers(seq_len, head_dim)


@dataclasses.dataclass(frozen=True)
class SparQ:
    """SparQ Attention (Ribar et al., 2024).

    rank: r, the number of query components used for the approximate scores (step 1).
    top_k: k, the number of positions fetched whole for exact attention (step 2).
    local_window: l, the most recent positions always kept (the newest one is kept regardless).
    reallocate_mean: step 3, give the attention mass left out to the mean value vector. The paper
        turns it off on grouped-query models (Llama 3, Mistral), where it hurt.
    group_scores: what step 2 ranks positions by when a KV head serves several query heads (they
        share one selection): "softmax" (the paper's wording) sums the approximate attention s_hat
        over the group; "logits" (the authors' research code, graphcore-research/llm-inference-research,
        llminference/methods/ann_attention.py, AnnAttention.forward) sums the temperature-scaled
        approximate logits q[i1] . K[:, i1] / tau instead. Either way tau, s_hat and alpha (step 3)
        stay per query head, and with one query head per KV head the two select the same positions.
    """

    rank: int
    top_k: int
    local_window: int = 0
    reallocate_mean: bool = True
    group_scores: str = "softmax"

    reads_transposed_keys = True
    stateful = False

    def __post_init__(self):
        _check_int("rank", self.rank, 1)
        _check_int("top_k", self.top_k, 1)
        _check_int("local_window", self.local_window, 0)
        if self.local_window > self.top_k:
            raise ValueError(
                f"local_window must be <= top_k, got local_window={self.local_window}, top_k={self.top_k}")
        if not isinstance(self.reallocate_mean, bool):
            raise ValueError(f"reallocate_mean must be a bool, got {self.reallocate_mean!r}")
        if not isinstance(self.group_scores, str) or self.group_scores not in GROUP_SCORES:
            raise ValueError(f"group_scores must be one of {', '.join(map(repr, GROUP_SCORES))}, "
                             f"got {self.group_scores!r}")

    def transfers(self, seq_len: int, head_dim: int) -> int:
        """Eq. 11: S*r (step 1) + 2*k*d (step 2) + 4*d (q, output, v_bar and the running V sum).
        ValueError if rank > head_dim (attend refuses that method too)."""
        if self.rank > head_dim:
            raise ValueError(f"SparQ rank must be <= head_dim={head_dim}, got rank={self.rank}")
        k = min(self.top_k, seq_len)
        return seq_len * self.rank + 2 * k * head_dim + 4 * head_dim

    @classmethod
    def for_compression(cls, ratio, head_dim: int, seq_len: int, *, reallocate_mean: bool = True,
                        group_scores: str = "softmax") -> "SparQ":
        """The paper's long-context recipe: r = ratio*d, k = ratio*S/2, l = k/4; k (then r) shrunk if
        that recipe lands more than 1% above `ratio` (short sequences, where the 4*d term matters).
        reallocate_mean and group_scores are passed on unchanged (they do not change the reads)."""
        ratio = parse_ratio(ratio)
        _check_shape_args(head_dim, seq_len)
        limit = ratio * dense_transfers(seq_len, head_dim) * _TOLERANCE
        rank = min(head_dim, max(1, round(ratio * head_dim)))
        top_k = max(1, math.floor(ratio * seq_len / 2))
        while True:
            fixed = seq_len * rank + 4 * head_dim
            fit = math.floor((limit - fixed) / (2 * head_dim))
            if fit >= 1:
                top_k = min(top_k, fit)
                break
            if rank == 1:
                raise ValueError(
                    f"SparQ cannot reach ratio={ratio:g} at head_dim={head_dim}, seq_len={seq_len}: "
                    f"even rank=1, top_k=1 reads {SparQ(1, 1).transfers(seq_len, head_dim)} of "
                    f"{dense_transfers(seq_len, head_dim)} elements")
            rank -= 1
        return cls(rank, top_k, local_window=top_k // 4, reallocate_mean=reallocate_mean,
                   group_scores=group_scores)


@dataclasses.dataclass(frozen=True)
class H2O:
    """Heavy-Hitter Oracle (Zhang et al., 2023): keep the top_k positions by accumulated attention,
    the last local_window always among them; evicted positions never return. Its state (the
    accumulated attention, -inf once evicted) lives in the cache: see KVCache.h2o_scores."""

    top_k: int
    local_window: int

    reads_transposed_keys = False
    stateful = True

    def __post_init__(self):
        _check_int("top_k", self.top_k, 1)
        _check_int("local_window", self.local_window, 0)
        if self.local_window > self.top_k:
            raise ValueError(
                f"local_window must be <= top_k, got local_window={self.local_window}, top_k={self.top_k}")

    def transfers(self, seq_len: int, head_dim: int) -> int:
        """2*k*d + 2*d, plus 2*S to read and write the accumulated scores."""
        return 2 * min(self.top_k, seq_len) * head_dim + 2 * head_dim + 2 * seq_len

    @classmethod
    def for_compression(cls, ratio, head_dim: int, seq_len: int) -> "H2O":
        ratio = parse_ratio(ratio)
        _check_shape_args(head_dim, seq_len)
        budget = ratio * dense_transfers(seq_len, head_dim) * _TOLERANCE
        top_k = math.floor((budget - 2 * head_dim - 2 * seq_len) / (2 * head_dim))
        if top_k < 1:
            raise ValueError(f"H2O cannot reach ratio={ratio:g} at head_dim={head_dim}, seq_len={seq_len}: "
                             f"its score reads alone cost 2*seq_len elements")
        return _closest(lambda k: cls(k, k // 4), min(top_k, seq_len), ratio, seq_len, head_dim)


@dataclasses.dataclass(frozen=True)
class Streaming:
    """LM-Infinite / StreamingLLM: the first `sink` positions and the most recent `window`."""

    sink: int
    window: int

    reads_transposed_keys = False
    stateful = False

    def __post_init__(self):
        _check_int("sink", self.sink, 0)
        _check_int("window", self.window, 0)
        if self.sink + self.window < 1:
            raise ValueError(f"sink + window must be >= 1, got sink={self.sink}, window={self.window}")

    def transfers(self, seq_len: int, head_dim: int) -> int:
        return 2 * min(self.sink + self.window, seq_len) * head_dim + 2 * head_dim

    @classmethod
    def for_compression(cls, ratio, head_dim: int, seq_len: int, *, sink: int = 16) -> "Streaming":
        ratio = parse_ratio(ratio)
        _check_shape_args(head_dim, seq_len)
        _check_int("sink", sink, 0)
        budget = ratio * dense_transfers(seq_len, head_dim) * _TOLERANCE
        keep = min(math.floor((budget - 2 * head_dim) / (2 * head_dim)), seq_len)
        if keep <= sink:
            raise ValueError(f"Streaming at ratio={ratio:g}, head_dim={head_dim}, seq_len={seq_len} keeps "
                             f"{keep} positions: not more than sink={sink}, so no recent position would fit")
        return _closest(lambda w: cls(sink, w), keep - sink, ratio, seq_len, head_dim)


@dataclasses.dataclass(frozen=True)
class FlexGen:
    """FlexGen's sparse attention: exact scores over all of K, then only the top_k rows of V, with the
    kept weights renormalised. Reads all of K, so its ratio never goes below 1/2."""

    top_k: int

    reads_transposed_keys = False
    stateful = False

    def __post_init__(self):
        _check_int("top_k", self.top_k, 1)

    def transfers(self, seq_len: int, head_dim: int) -> int:
        return seq_len * head_dim + min(self.top_k, seq_len) * head_dim + 2 * head_dim

    @classmethod
    def for_compression(cls, ratio, head_dim: int, seq_len: int) -> "FlexGen":
        ratio = parse_ratio(ratio)
        _check_shape_args(head_dim, seq_len)
        budget = ratio * dense_transfers(seq_len, head_dim) * _TOLERANCE
        top_k = math.floor((budget - seq_len * head_dim - 2 * head_dim) / head_dim)
        if top_k < 1:
            floor = FlexGen(1).transfers(seq_len, head_dim) / dense_transfers(seq_len, head_dim)
            raise ValueError(f"FlexGen reads all of K, so its transfer ratio never goes below 1/2 "
                             f"({floor:.4f} at head_dim={head_dim}, seq_len={seq_len}); got ratio={ratio:g}")
        return _closest(cls, min(top_k, seq_len), ratio, seq_len, head_dim)


METHODS = {"dense": Dense, "sparq": SparQ, "h2o": H2O, "streaming": Streaming, "flexgen": FlexGen}
# The method names every script, the evaluation API and the lm-eval backend accept (method_from_name).
METHOD_NAMES = ("dense", "sparq", "sparq-mean", "sparq-logits", "h2o", "streaming", "flexgen")


def method_from_name(name: str, ratio, head_dim: int, seq_len: int, *, grouped: bool = True):
    """The method called `name` (one of METHOD_NAMES) at transfer ratio `ratio` for a cache of seq_len
    positions and heads of head_dim (Dense ignores all three).

    sparq: the paper's setting, mean reallocation on only when each KV head serves one query head
    (grouped=False), since the paper found it hurt grouped-query models; sparq-mean: reallocation on;
    sparq-logits: off, KV groups ranked by summed approximate logits (the authors' code);
    streaming: 16 sink positions and a recent window; flexgen: ratios >= its floor of ~1/2.
    ValueError names an unknown name, or says how to fix a budget the method cannot reach.
    """
    if name not in METHOD_NAMES:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    if name == "dense":
        return Dense()
    ratio = parse_ratio(ratio, "compression")
    _check_shape_args(head_dim, seq_len)

    def build(length):
        if name.startswith("sparq"):
            return SparQ.for_compression(ratio, head_dim, length,
                                         reallocate_mean=name == "sparq-mean" or (name == "sparq" and not grouped),
                                         group_scores="logits" if name == "sparq-logits" else "softmax")
        return METHODS[name].for_compression(ratio, head_dim, length)

    try:
        return build(seq_len)
    except ValueError as err:
        # The budget is out of reach. A longer prompt helps only if the ratio is above the method's
        # floor for long prompts (a few reads per position, or FlexGen's all of K, stay).
        try:
            build(seq_len * 64)
            advice = "Use a longer prompt or a larger compression (e.g. 1/2)"
        except ValueError:
            advice = "Use a larger compression (e.g. 1/2)"
        raise ValueError(f"method {name} at compression {ratio:g}: {err}. {advice}, or leave {name} out") from None


KNOWN_METHODS = (Dense, SparQ, H2O, Streaming, FlexGen)


def check_method(method) -> None:
    """TypeError unless `method` is one of the attention methods (an instance, not a class or a name)."""
    if not isinstance(method, KNOWN_METHODS):
        raise TypeError(f"method must be an instance of one of {', '.join(c.__name__ for c in KNOWN_METHODS)} "
                        f"(sparq_jax; by name: sq.method_from_name), got {method!r}")
