"""The evaluation harness: tasks fed through a LanguageModel, every scored token out of a decode step
run with the method under test, from one dense prefill per batch of prompts shared by every method.

Protocol (as in the paper; the prompt's prefill is dense):
- passkey: filler with a hidden 5-digit key; the question's tokens go through decode steps (so the
  method sees the question, as in Quest), then greedy decoding; exact match of the key.
- multikey: the same with several keys (a word and its own value each), one of them asked for.
- repetition: held-out text, a newline, then a span copied from inside it; the prompt's last token
  goes through a decode step, then greedy decoding until the output diverges from the text that
  really follows the span (score: characters matched, of 256).
- bpc: a held-out window; its last tokens (up to 256, at most half) are teacher-forced through
  decode steps, each step's logits scoring the next token; bits per character of that tail.
Each method is built by sq.method_from_name(name, ratio, head_dim, cache length) (for bpc, the mean
cache length over the scored steps); a row's transfer_ratio is measured by models.TransferMeter.
"""
from __future__ import annotations

import functools
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import sparq_jax as sq
from sparq_jax import tasks

from ..lm import LanguageModel, TransferMeter
from . import prompts as text

COMPRESSION = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
# Samples per task unless `limit` says otherwise: a few minutes of CPU for the bundled model's grid.
DEFAULT_N = {"passkey": 40, "multikey": 40, "repetition": 32, "bpc": 16, "needle": 25, "code": 20}
BPC_SCORED = 256           # tokens of each bpc window scored through decode steps (at most half)


# Shapes and budgets are bucketed so that the batches of a grid share their compiles (a decode step is
# one compile per cache shape and method budget, both static): widths round up to a multiple of
# WIDTH_UNIT, budgets are sized at a cache length rounded down to 16 steps an octave (<= 6.25% below
# the real length, so a measured ratio may land that much under its target, never above it).
WIDTH_UNIT = 128
BUDGET_STEPS_PER_OCTAVE = 16


def budget_length(n: int) -> int:
    """n rounded down to 16 steps an octave (exact below 32): the cache length budgets are sized at."""
    if n < 2 * BUDGET_STEPS_PER_OCTAVE:
        return int(n)
    unit = 1 << (int(n).bit_length() - 1 - BUDGET_STEPS_PER_OCTAVE.bit_length() + 1)
    return int(n) // unit * unit


def round_up(n: int, unit: int = WIDTH_UNIT) -> int:
    return -(-int(n) // unit) * unit


def release_memory() -> None:
    """Give freed host memory back to the system. glibc keeps the freed blocks of a finished run's
    cache copies in its heaps, fragmented, and each new executable's run then grew the process by up
    to a cache's size (measured: +1.1 GB a method at 10 rows x 2k of SmolLM2); malloc_trim returns
    them (a no-op off glibc)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows left-padded to one width (the longest, rounded up to WIDTH_UNIT) -> ids, mask [B, W]."""
    width = round_up(max(len(r) for r in rows))
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


class Prefilled:
    """One dense prefill of a batch of token rows, serving every method: K^T kept (SparQ), H2O's
    scores seeded. The last `forced` tokens of each row are not prefilled but fed through decode steps
    with the method (`force`); `extra` more positions are left for generated tokens. `info` holds what
    the task needs to score. state, lengths [B] (prefilled tokens per row), forced [B, forced]."""

    def __init__(self, lm: LanguageModel, rows: list[list[int]], forced: int, extra: int, progress=None, **info):
        if forced < 1 or min(map(len, rows)) <= forced:
            raise ValueError(f"every prompt needs more than {forced} tokens")
        pad = lm.pad_token_id if lm.pad_token_id is not None else 0
        ids, mask = left_pad([r[:-forced] for r in rows], pad)
        max_len = round_up(ids.shape[1] + forced + extra)
        _, self.state = lm.prefill(ids, mask, max_len=max_len, transposed_keys=True, h2o=True, progress=progress)
        self.lengths = mask.sum(axis=1)
        self.forced = np.asarray([r[-forced:] for r in rows], np.int32)
        self.info = info

    def method(self, method_of, seq_len: int):
        """method_of(the budget length of seq_len): the method for caches of about seq_len positions."""
        return method_of(budget_length(seq_len))

    def fresh(self):
        # decode_step donates its state, so each method decodes from its own copy of the prefill.
        return jax.tree.map(jnp.copy, self.state), self.lengths.copy()


@jax.jit
def token_nll(logits, targets):
    """-log p(targets) [B] under fp32 logits [B, V]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


def _greedy(logits) -> np.ndarray:
    return np.asarray(jnp.argmax(logits, axis=-1)).astype(np.int32)


class Decoding:
    """A method decoding from a Prefilled: step(tokens) runs one decode step and meters its transfers.
    After force(), logits are those of the last forced token."""

    def __init__(self, lm: LanguageModel, prefilled: Prefilled, method):
        self.lm, self.method = lm, method
        self.state, self.lengths = prefilled.fresh()
        self.meter = TransferMeter(method, lm.config.head_dim, lm.config.sliding_window)
        self.logits = None

    def step(self, tokens):
        self.lengths = self.lengths + 1
        self.meter.step(self.lengths)
        self.logits, self.state = self.lm.decode_step(tokens, self.state, method=self.method)
        return self.logits

    def force(self, forced: np.ndarray) -> None:
        for j in range(forced.shape[1]):
            self.step(forced[:, j])


def prefill_passkey(lm, samples: list[tasks.PasskeySample], progress=None) -> Prefilled:
    """Passkey and multi-key: the question's tokens (as many as the shortest question has) go through
    decode steps, so the method sees the question, as in Quest; the rest is prefilled."""
    tok = lm.tokenizer
    rows = [text.prefix(tok) + text.encode(tok, s.context + s.question) for s in samples]
    forced = min(len(text.encode(tok, s.question)) for s in samples)
    new = max(len(text.encode(tok, s.answer)) for s in samples) + 2
    return Prefilled(lm, rows, forced, new, progress, new_tokens=new)


def run_passkey(lm, samples: list[tasks.PasskeySample], method_of, prefilled: Prefilled):
    """-> (scores [n], TransferMeter): greedy tokens after the question; exact match of the key."""
    run = Decoding(lm, prefilled, prefilled.method(method_of, int(prefilled.lengths.max()) + prefilled.forced.shape[1]))
    run.force(prefilled.forced)
    out = []
    for j in range(prefilled.info["new_tokens"]):
        token = _greedy(run.logits)
        out.append(token)
        if j + 1 < prefilled.info["new_tokens"]:
            run.step(token)
    generated = np.stack(out, axis=1)
    scores = [tasks.score_passkey(text.decode(lm.tokenizer, g).lstrip(), s.answer) for g, s in zip(generated, samples)]
    return np.asarray(scores, np.float64), run.meter


def prefill_repetition(lm, samples: list[tasks.RepetitionSample], progress=None) -> Prefilled:
    # The prompt's last token goes through a decode step, so the first scored character is sparse too.
    tok = lm.tokenizer
    rows = [text.prefix(tok) + text.encode(tok, s.prompt) for s in samples]
    new = max(len(text.encode(tok, s.target)) for s in samples) + 4
    return Prefilled(lm, rows, 1, new, progress, new_tokens=new)


def still_matching(generated: str, target: str) -> bool:
    """Whether `generated` is a proper prefix-so-far of target (no divergence yet, target not used up)."""
    n = min(len(generated), len(target))
    return generated[:n] == target[:n] and len(generated) < len(target)


def run_repetition(lm, samples: list[tasks.RepetitionSample], method_of, prefilled: Prefilled):
    """-> (characters matched [n], TransferMeter): greedy decoding until every row has diverged from
    the text that really follows the span (or has matched all of it)."""
    run = Decoding(lm, prefilled, prefilled.method(method_of, int(prefilled.lengths.max()) + prefilled.forced.shape[1]))
    run.force(prefilled.forced)
    generated = [[] for _ in samples]
    alive = np.ones(len(samples), bool)
    for j in range(prefilled.info["new_tokens"]):
        token = _greedy(run.logits)
        for i in np.flatnonzero(alive):
            generated[i].append(int(token[i]))
            alive[i] = still_matching(text.decode(lm.tokenizer, generated[i]), samples[i].target)
        # Later characters cannot change a score once every row has diverged.
        if not alive.any() or j + 1 == prefilled.info["new_tokens"]:
            break
        run.step(token)
    scores = [tasks.score_repetition(text.decode(lm.tokenizer, g), s.target) for g, s in zip(generated, samples)]
    return np.asarray(scores, np.float64), run.meter


def prefill_bpc(lm, windows: list[str], scored: int = BPC_SCORED, progress=None) -> Prefilled:
    """Each window's tokens (cut to the shortest window's count): all but the last scored + 1 are
    prefilled; the rest are teacher-forced through decode steps, each step's logits scoring the next."""
    tok = lm.tokenizer
    rows = [text.prefix(tok) + text.encode(tok, w) for w in windows]
    width = min(map(len, rows))
    scored = min(scored, width // 2)
    rows = [r[:width] for r in rows]
    chars = [len(text.decode(tok, r[width - scored:])) for r in rows]
    return Prefilled(lm, rows, scored + 1, 0, progress, chars=chars)


def run_bpc(lm, windows: list[str], method_of, prefilled: Prefilled):
    """-> (bits per char of each window's scored tail, TransferMeter)."""
    forced = prefilled.forced
    steps = forced.shape[1] - 1
    # S grows over the scored steps while the budget stays fixed: size the budget at the mean length.
    run = Decoding(lm, prefilled, prefilled.method(method_of, int(prefilled.lengths.max()) + steps // 2 + 1))
    nats = np.zeros(len(forced), np.float64)
    for j in range(steps):
        logits = run.step(forced[:, j])
        nats += np.asarray(token_nll(logits, jnp.asarray(forced[:, j + 1])), np.float64)
    return np.asarray([tasks.bits_per_char(x, c) for x, c in zip(nats, prefilled.info["chars"])]), run.meter


RUNNERS = {"passkey": (prefill_passkey, run_passkey), "multikey": (prefill_passkey, run_passkey),
           "needle": (prefill_passkey, run_passkey), "repetition": (prefill_repetition, run_repetition),
           "code": (prefill_repetition, run_repetition), "bpc": (prefill_bpc, run_bpc)}


def configurations(methods, ratios) -> list[tuple[str, float]]:
    """(method, ratio) pairs of the grid; dense once, at ratio 1."""
    out = []
    for m in methods:
        if m == "dense":
            out.append((m, 1.0))
        else:
            out.extend((m, r) for r in ratios)
    return out


def evaluate(lm: LanguageModel, task_names, methods, ratios=COMPRESSION, limit: Optional[int] = None,
             context_length: Optional[int] = None, seed: int = 0, heldout: Optional[str] = None, batch: int = 16,
             progress: bool = True, done=(), on_result: Optional[Callable[[dict], None]] = None,
             bpc_tokens: int = BPC_SCORED) -> list[dict]:
    """Result rows {"task", "method", "compression", "transfer_ratio", "score", "n"} for the grid of
    tasks (prompts.TASKS) x methods (sq.METHOD_NAMES; dense once) x ratios.

    Per task and batch of samples: one dense prefill, then every method from it. limit: samples per
    task (default DEFAULT_N); context_length: prompt tokens (default the model's context); heldout:
    the text of repetition and bpc (default prompts.heldout_text()). Cells in `done` ((task, method,
    compression) triples) are skipped; on_result(row) is called as each row is ready (to save
    progress). Every sample and budget is built before any model work; a method that cannot reach a
    ratio raises, except FlexGen below its floor of ~1/2, which is skipped with a note on stderr.
    """
    if lm.tokenizer is None:
        raise ValueError("the model has no tokenizer; the evaluation tasks are text")
    for name in methods:
        if name not in sq.METHOD_NAMES:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(sq.METHOD_NAMES)}")
    context_length = context_length or lm.config.max_position_embeddings
    d = lm.config.head_dim
    grouped = lm.config.num_key_value_heads < lm.config.num_attention_heads
    done = set(done)
    results = []
    plan = {}
    for task in task_names:
        cells = []
        for name, ratio in configurations(methods, ratios):
            if (task, name, ratio) in done:
                continue
            try:
                sq.method_from_name(name, ratio, d, context_length, grouped=grouped)
            except ValueError as err:
                if name != "flexgen":
                    raise
                tqdm.write(f"skipped {name} at {ratio:g}: {err}", file=sys.stderr)
                continue
            cells.append((name, ratio))
        if cells:
            plan[task] = cells
    n_of = {t: limit or DEFAULT_N[t] for t in plan}
    if set(plan) & {"repetition", "bpc"} and heldout is None:
        heldout = text.heldout_text()
    samples_of = {t: text.build_samples(lm.tokenizer, t, n_of[t], context_length, seed, heldout)
                  for t in plan}  # errors first
    units = sum(-(-n_of[t] // batch) * (1 + len(c)) for t, c in plan.items())
    tqdm.write(f"work: {sum(n_of[t] * context_length for t in plan)} prompt tokens prefilled, "
               f"{sum(n_of[t] * len(c) for t, c in plan.items())} (sample, method) runs", file=sys.stderr)
    bar = tqdm(total=units, desc="evaluate", dynamic_ncols=True, disable=not progress, file=sys.stderr)
    start = time.time()
    for task, cells in plan.items():
        samples = samples_of[task]
        prefill_fn, run_fn = RUNNERS[task]
        if task == "bpc":
            prefill_fn = functools.partial(prefill_fn, scored=bpc_tokens)
        scores = {c: [] for c in cells}
        moved = {c: [0, 0] for c in cells}
        for b0 in range(0, len(samples), batch):
            chunk = samples[b0:b0 + batch]
            bar.set_postfix_str(f"{task} prefill")
            prefilled = prefill_fn(lm, chunk, progress=lambda done, total, t0=time.perf_counter(): bar.set_postfix_str(
                f"{task} prefill {done}/{total} tok, {done / (time.perf_counter() - t0):.0f} tok/s"))
            bar.update()
            for name, ratio in cells:
                bar.set_postfix_str(f"{task} {name} {ratio:g}")
                method_of = functools.partial(sq.method_from_name, name, ratio, d, grouped=grouped)
                s, meter = run_fn(lm, chunk, lambda seq_len: method_of(seq_len), prefilled)
                scores[(name, ratio)].extend(s.tolist())
                moved[(name, ratio)][0] += meter.method_total
                moved[(name, ratio)][1] += meter.dense_total
                release_memory()
                bar.update()
            del prefilled
            if bar.n and b0 == 0 and task == next(iter(plan)):
                tqdm.write(f"estimated time: {(time.time() - start) / bar.n * units / 60:.0f} min "
                           f"(from the first batch)", file=sys.stderr)
        for name, ratio in cells:
            row = {"task": task, "method": name, "compression": ratio,
                   "transfer_ratio": moved[(name, ratio)][0] / moved[(name, ratio)][1],
                   "score": float(np.mean(scores[(name, ratio)])), "n": len(scores[(name, ratio)])}
            if task == "needle":         # the samples cycle through the depths: each depth's mean score
                depth_of = [text.NEEDLE_DEPTHS[i % len(text.NEEDLE_DEPTHS)] for i in range(len(samples))]
                row["by_depth"] = {f"{d:g}": float(np.mean([x for x, e in zip(scores[(name, ratio)], depth_of)
                                                              if e == d])) for d in sorted(set(depth_of))}
            results.append(row)
            if on_result is not None:
                on_result(row)
    bar.close()
    return results
