"""Evaluation tasks, built from text and scored from text: passkey retrieval, repetition, bits per char.

Builders are pure functions of their arguments (a seed, the held-out text): no file I/O, no model.
The harness that feeds them through a model is models.evaluation. Lengths are in characters; the
project's models are byte-level, so a character is a token (the held-out texts are ASCII).

- Passkey retrieval (the Landmark Attention / Quest construction): a random 5-digit key hidden at
  a given depth of repeated filler sentences, and a question at the end. Score: exact match.
- Repetition (the SparQ paper's task, scaled down): a context of held-out Shakespeare, a newline,
  then a span copied from inside the context; the model should continue with what followed the
  span. Score: characters matched before the first divergence.
- Multi-key retrieval (RULER's multi-key needle in a haystack, in this file's words): several keys,
  each a word with its own 5-digit value, hidden in the filler; the question asks for one of them.
  Score: exact match of that value.
- Bits per character of held-out text, teacher-forced (the paper's WikiText-103 BPC).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from sparq_jax.validation import check_int

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                 "them. I will quiz you about the important information there.\n\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "What is the pass key? The pass key is "
PASSKEY_DIGITS = 5
MULTIKEY_INTRO = ("There are several pass keys hidden inside a lot of irrelevant text. Find them and "
                  "memorize them.\n")
MULTIKEY_WORDS = ("apple", "river", "candle", "tiger", "violin", "garden", "rocket", "pepper", "silver",
                  "castle", "forest", "pencil", "rabbit", "window", "dragon", "orange")
NEEDLE_DIGITS = 7
REPETITION_SPAN = 128
REPETITION_CONTINUATION = 256


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def _check_text(text, needed: int):
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if len(text) < needed:
        raise ValueError(f"text has {len(text)} characters; the task needs at least {needed}")


@dataclasses.dataclass(frozen=True)
class PasskeySample:
    """context: everything before the question (prefilled); question: fed through decode steps;
    answer: the key the model must generate next; depth: where the key sits (0 = start, 1 = end)."""

    context: str
    question: str
    answer: str
    depth: float


def passkey_samples(n: int, length: int, seed: int) -> list[PasskeySample]:
    """n passkey prompts of `length` characters in all (context + question + answer), the key at
    depths spread evenly over [0, 1] and drawn at random (5 digits, no leading zero) from `seed`."""
    check_int("n", n)
    check_int("length", length)
    _check_seed(seed)
    rng = np.random.default_rng(seed)
    fixed = len(PASSKEY_INTRO) + len(PASSKEY_QUESTION) + PASSKEY_DIGITS
    needle_len = len(passkey_needle("0" * PASSKEY_DIGITS))
    reps = (length - fixed - needle_len) // len(PASSKEY_FILLER)
    if reps < 1:
        raise ValueError(f"length={length} is too short for a passkey prompt: it needs at least "
                         f"{fixed + needle_len + len(PASSKEY_FILLER)} characters")
    depths = np.linspace(0.0, 1.0, n) if n > 1 else np.array([0.5])
    samples = []
    for depth in depths:
        key = str(int(rng.integers(10 ** (PASSKEY_DIGITS - 1), 10 ** PASSKEY_DIGITS)))
        before = int(round(depth * reps))
        context = (PASSKEY_INTRO + PASSKEY_FILLER * before + passkey_needle(key) + PASSKEY_FILLER * (reps - before))
        samples.append(PasskeySample(context, PASSKEY_QUESTION, key, float(depth)))
    return samples


def passkey_needle(key: str) -> str:
    """The sentence that hides `key` in a passkey prompt."""
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def score_passkey(generated: str, answer: str) -> float:
    """1.0 if the generated text starts with exactly the key (nothing else is asked for), else 0.0."""
    return float(generated[:len(answer)] == answer)


def _multikey_line(word: str, value: str) -> str:
    return f"The pass key of the {word} is {value}. "


def _multikey_question(word: str) -> str:
    return f"\nWhat is the pass key of the {word}? The pass key of the {word} is "


def multikey_samples(n: int, length: int, seed: int, keys: int = 8) -> list[PasskeySample]:
    """n prompts of `length` characters in all, each hiding `keys` distinct words of MULTIKEY_WORDS
    with their own random 5-digit values (no leading zero, all different) between filler sentences
    at random places; the question (fed through decode steps) asks for one of them, and its value
    is the answer. depth: where the asked line starts, as a fraction of the context's characters."""
    check_int("n", n)
    check_int("length", length)
    check_int("keys", keys)
    _check_seed(seed)
    if keys > len(MULTIKEY_WORDS):
        raise ValueError(f"keys must be <= {len(MULTIKEY_WORDS)} (the words available), got {keys}")
    rng = np.random.default_rng(seed)
    longest = max(map(len, MULTIKEY_WORDS))
    fixed = (len(MULTIKEY_INTRO) + keys * len(_multikey_line("x" * longest, "0" * PASSKEY_DIGITS))
             + len(_multikey_question("x" * longest)) + PASSKEY_DIGITS)
    reps = (length - fixed) // len(PASSKEY_FILLER)
    if reps < keys:
        raise ValueError(f"length={length} is too short for {keys} keys: it needs at least "
                         f"{fixed + keys * len(PASSKEY_FILLER)} characters")
    samples = []
    for _ in range(n):
        words = [str(w) for w in rng.choice(MULTIKEY_WORDS, keys, replace=False)]
        values = [str(v) for v in rng.choice(np.arange(10 ** (PASSKEY_DIGITS - 1), 10 ** PASSKEY_DIGITS), keys,
                                             replace=False)]
        after = np.sort(rng.choice(reps, keys, replace=False))        # the filler sentence each follows
        asked = int(rng.integers(keys))
        parts, j, at = [MULTIKEY_INTRO], 0, 0
        for r in range(reps):
            parts.append(PASSKEY_FILLER)
            while j < keys and after[j] == r:
                if j == asked:
                    at = sum(map(len, parts))
                parts.append(_multikey_line(words[j], values[j]))
                j += 1
        context = "".join(parts)
        samples.append(PasskeySample(context, _multikey_question(words[asked]), values[asked], at / len(context)))
    return samples


@dataclasses.dataclass(frozen=True)
class RepetitionSample:
    """prompt: context + newline + span; target: the characters that follow the span in the context."""

    prompt: str
    target: str


def repetition_samples(text: str, n: int, length: int, seed: int, span: int = REPETITION_SPAN,
                       continuation: int = REPETITION_CONTINUATION, min_gap: int = 0,
                       lines: bool = False) -> list[RepetitionSample]:
    """n repetition prompts from `text`: a context of length - span - continuation - 1 characters
    (so prompt + continuation fill `length`), a newline, then `span` characters copied from inside
    the context at a random place that ends at least `min_gap` characters before the context's end
    (so the copy must come from far back, outside any recent window); target: the `continuation`
    characters that follow the copied span in the context. lines=True (for code): the span starts at
    a line's start and ends with a newline (at most `span` characters, at least one whole line), so the
    copy restarts whole lines, as a restarted source file does, and no token is cut at its end."""
    for name, value in (("n", n), ("length", length), ("span", span), ("continuation", continuation)):
        check_int(name, value)
    check_int("min_gap", min_gap, 0)
    _check_seed(seed)
    ctx_len = length - span - continuation - 1
    if ctx_len < span + continuation + min_gap:
        raise ValueError(f"length={length} is too short for repetition with span={span}, "
                         f"continuation={continuation}, min_gap={min_gap}: it needs at least "
                         f"{2 * (span + continuation) + min_gap + 1}")
    _check_text(text, ctx_len + 1)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        start = int(rng.integers(0, len(text) - ctx_len + 1))
        ctx = text[start:start + ctx_len]
        at = int(rng.integers(0, ctx_len - span - continuation - min_gap + 1))
        end = at + span
        if lines:
            at = ctx.rfind("\n", 0, at) + 1                  # back to its line's start: still far enough back
            cut = ctx.rfind("\n", at, at + span)
            end = cut + 1 if cut >= 0 else ctx.find("\n", at) + 1 or at + span
        samples.append(RepetitionSample(ctx + "\n" + ctx[at:end], ctx[end:end + continuation]))
    return samples


def score_repetition(generated: str, target: str) -> int:
    """Characters of `generated` that match `target` before the first divergence."""
    n = 0
    for a, b in zip(generated, target):
        if a != b:
            break
        n += 1
    return n


NEEDLE_QUESTION = "\n\nWhat is the special magic number mentioned in the text above? The special magic number is "


def _needle_sentence(value: str) -> str:
    return f" The special magic number is {value}. "


def needle_samples(haystack: str, n: int, length: int, seed: int, depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                   min_gap: int = 0) -> list[PasskeySample]:
    """Needle in a haystack (Kamradt's test, with RULER's numeric needle so that exact match scores it):
    n prompts of `length` characters in all, each a window of `haystack` (natural prose, e.g. essays)
    with " The special magic number is <7 digits>. " inserted at a sentence end, then NEEDLE_QUESTION.
    Depths cycle through `depths`; depth d puts the needle at d * (context - min_gap) characters, so
    even d = 1 leaves min_gap characters between the needle and the question (retrieval from far back,
    outside any recent window). depth in the samples: the needle's start / the context's length."""
    check_int("n", n)
    check_int("length", length)
    check_int("min_gap", min_gap, 0)
    _check_seed(seed)
    depths = [float(d) for d in depths]
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be fractions in [0, 1], got {depths!r}")
    ctx_len = length - len(NEEDLE_QUESTION) - len(_needle_sentence("0" * NEEDLE_DIGITS)) - NEEDLE_DIGITS
    if ctx_len < min_gap + 200:
        raise ValueError(f"length={length} is too short for a needle with min_gap={min_gap}: it needs at least "
                         f"{length - ctx_len + min_gap + 200} characters")
    _check_text(haystack, ctx_len + 1)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        depth = depths[i % len(depths)]
        start = int(rng.integers(0, len(haystack) - ctx_len + 1))
        ctx = haystack[start:start + ctx_len]
        want = int(depth * (ctx_len - min_gap))
        # the sentence end nearest before the wanted place (else the wanted place itself)
        at = max(ctx.rfind(". ", 0, want) + 1, 0) if want else 0
        at = at if want - at < 400 else want
        value = str(int(rng.integers(10 ** (NEEDLE_DIGITS - 1), 10 ** NEEDLE_DIGITS)))
        rest = ctx[at + 1:] if ctx[at:at + 1] == " " else ctx[at:]      # the needle brings its own spaces
        context = ctx[:at] + _needle_sentence(value) + rest
        samples.append(PasskeySample(context, NEEDLE_QUESTION, value, at / len(context)))
    return samples


def bpc_windows(text: str, n: int, length: int, seed: int) -> list[str]:
    """n windows of `length` characters from `text`, at non-overlapping random places where the
    text allows (evenly spaced strata, a random offset in each), so the estimate covers the text."""
    check_int("n", n)
    check_int("length", length)
    _check_seed(seed)
    _check_text(text, length)
    rng = np.random.default_rng(seed)
    room = len(text) - length
    stride = room / n
    starts = [int(i * stride + rng.integers(0, max(1, int(stride)))) for i in range(n)]
    return [text[s:s + length] for s in starts]


def bits_per_char(total_nats: float, chars: int) -> float:
    """Cross-entropy in bits per character from nats summed over `chars` predicted characters."""
    check_int("chars", chars)
    return float(total_nats) / math.log(2) / chars
