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

import contextvars
import dataclasses
import functools
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import sparq_jax as sq
from sparq_jax.validation import check_int, parse_ratio

from . import ruler, tasks

from ..lm import LanguageModel, TransferMeter
from . import prompts as text

COMPRESSION = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
# Samples per task unless `limit` says otherwise: a few minutes of CPU for the bundled model's grid.
DEFAULT_N = {"passkey": 40, "multikey": 40, "repetition": 32, "bpc": 16, "needle": 25, "code": 20,
             **{t: ruler.DEFAULT_N for t in ruler.TASKS}}
BPC_SCORED = 256           # tokens of each bpc window scored through decode steps (at most half)
MIN_CONTEXT = 64           # the shortest context_length taken (a task may need more: prepare() says how much)
# The default context_length is the model's max_position_embeddings less this room for what is decoded
# after the prompt (question, answer, scored continuation), so that no task decodes past the positions
# the model was trained on.
ANSWER_ROOM = 32


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


# While prepare() measures a task's positions, prefill_rows records them here instead of prefilling.
_measuring: contextvars.ContextVar = contextvars.ContextVar("_measuring", default=None)


class _Measured(Exception):
    pass


def prefill_rows(lm: LanguageModel, rows: list[list[int]], extra: int, **options):
    """Left-padded dense prefill of token rows (widths bucketed, so nearby lengths share a compile)
    with room for `extra` more positions -> (logits [B, V], state, lengths [B]). options: lm.prefill's
    cache flags."""
    measured = _measuring.get()
    if measured is not None:
        measured.append(max(map(len, rows)) + extra)
        raise _Measured
    pad = lm.pad_token_id if lm.pad_token_id is not None else 0
    ids, mask = left_pad(rows, pad)
    logits, state = lm.prefill(ids, mask, max_len=round_up(ids.shape[1] + extra), **options)
    return logits, state, mask.sum(axis=1)


class Prefilled:
    """One dense prefill of a batch of token rows, serving every method: K^T kept (SparQ), H2O's
    scores seeded. The last `forced` tokens of each row are not prefilled but fed through decode steps
    with the method (`force`); `extra` more positions are left for generated tokens. `info` holds what
    the task needs to score. state, lengths [B] (prefilled tokens per row), forced [B, forced]."""

    def __init__(self, lm: LanguageModel, rows: list[list[int]], forced: int, extra: int, progress=None, **info):
        if forced < 1 or min(map(len, rows)) <= forced:
            raise ValueError(f"every prompt needs more than {forced} tokens")
        _, self.state, self.lengths = prefill_rows(lm, [r[:-forced] for r in rows], forced + extra,
                                                   transposed_keys=True, h2o=True, progress=progress)
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


def greedy(logits) -> np.ndarray:
    return np.asarray(jnp.argmax(logits, axis=-1)).astype(np.int32)


class Decoding:
    """A method decoding from a prefill: step(tokens) runs one decode step and meters its transfers
    (`steps` counts them). Decoding(lm, prefilled, method) starts from a copy of a Prefilled (logits
    None until a step); Decoding.start from a prefill's own state, which it consumes, and logits.
    After force(), logits are those of the last forced token."""

    def __init__(self, lm: LanguageModel, prefilled: Prefilled, method, meter: Optional[TransferMeter] = None):
        self._begin(lm, *prefilled.fresh(), method, meter, None)

    @classmethod
    def start(cls, lm: LanguageModel, state, lengths, method, meter: Optional[TransferMeter] = None,
              logits=None) -> "Decoding":
        """From lm.prefill's state and lengths [B] (decode_step donates the state: not used again);
        meter: a TransferMeter to add this run's transfers to (its method set to `method`)."""
        run = cls.__new__(cls)
        run._begin(lm, state, lengths, method, meter, logits)
        return run

    def _begin(self, lm, state, lengths, method, meter, logits) -> None:
        self.lm, self.method, self.state, self.lengths, self.logits, self.steps = lm, method, state, lengths, logits, 0
        if meter is None:
            meter = TransferMeter(method, lm.config.head_dim, lm.config.sliding_window)
        meter.method = method
        self.meter = meter

    def step(self, tokens):
        self.lengths = self.lengths + 1
        self.meter.step(self.lengths)
        self.logits, self.state = self.lm.decode_step(tokens, self.state, method=self.method)
        self.steps += 1
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
        token = greedy(run.logits)
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
        token = greedy(run.logits)
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
           "code": (prefill_repetition, run_repetition), "bpc": (prefill_bpc, run_bpc),
           **{t: (ruler.prefill, ruler.run) for t in ruler.TASKS}}


def configurations(methods, ratios) -> list[tuple[str, float]]:
    """(method, ratio) pairs of the grid; dense once, at ratio 1."""
    out = []
    for m in methods:
        if m == "dense":
            out.append((m, 1.0))
        else:
            out.extend((m, r) for r in ratios)
    return out


def positions_needed(model, task: str, samples: list, batch: int, bpc_tokens: int = BPC_SCORED) -> int:
    """The most positions a row of `task`'s samples reaches (prompt, forced and decoded tokens), batch
    by batch as evaluate() runs them: the tasks' own prefill functions, stopped before any model work.
    model: anything with .tokenizer (no weights are needed)."""
    prefill_fn = RUNNERS[task][0]
    if task == "bpc":
        prefill_fn = functools.partial(prefill_fn, scored=bpc_tokens)
    found = []
    token = _measuring.set(found)
    try:
        for b0 in range(0, len(samples), batch):
            try:
                prefill_fn(model, samples[b0:b0 + batch])
            except _Measured:
                pass
    finally:
        _measuring.reset(token)
    return max(found, default=0)          # 0: a task whose prefill does not go through prefill_rows


def _shortest_context(tokenizer, task: str, context_length: int, limit: int, seed: int, heldout) -> Optional[int]:
    """The shortest context length >= context_length (<= limit) at which `task` builds a sample, or None."""
    def builds(n: int) -> bool:
        try:
            text.build_samples(tokenizer, task, 1, n, seed, heldout)
            return True
        except ValueError:
            return False
    if not builds(limit):
        return None
    low, high = context_length, limit          # builds(high); not builds(low)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if builds(mid) else (mid, high)
    return high


@dataclasses.dataclass
class Grid:
    """What evaluate() will run, checked: the context length, per task the cells to run ((method,
    ratio) pairs, those in `done` left out) and the samples."""

    context_length: int
    cells: dict
    samples: dict


def prepare(model, task_names, methods, ratios=COMPRESSION, limit: Optional[int] = None,
            context_length: Optional[int] = None, seed: int = 0, heldout: Optional[str] = None, batch: int = 16,
            done=(), bpc_tokens: int = BPC_SCORED, beyond_positions: bool = False) -> Grid:
    """Every check of evaluate(), with no model work: `model` needs only .config and .tokenizer (a
    LanguageModel, or models.hf.open_checkpoint's config and tokenizer before any weight is read).
    ValueError naming the value, the limit and what to change: unknown tasks or methods, a ratio a
    method cannot reach (FlexGen below its floor is skipped with a note), a context_length under
    MIN_CONTEXT or under what a task needs with this tokenizer, or one whose rows (prompt and decoded
    tokens) go past max_position_embeddings unless beyond_positions=True. context_length defaults to
    max_position_embeddings - ANSWER_ROOM."""
    config, tokenizer = model.config, model.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; the evaluation tasks are text")
    task_names = ruler.expand(task_names)         # "ruler": its eleven tasks
    for name in task_names:
        if name not in text.TASKS and name not in RUNNERS:
            raise ValueError(f"unknown task {name!r}; choose from {', '.join(text.TASKS + (ruler.GROUP,) + ruler.TASKS)}")
    for name in methods:
        if name not in sq.METHOD_NAMES:
            raise ValueError(f"unknown method {name!r}; choose from {', '.join(sq.METHOD_NAMES)}")
    ratios = [parse_ratio(r, "ratio") for r in ratios]
    batch, bpc_tokens = check_int("batch", batch), check_int("bpc_tokens", bpc_tokens)
    if limit is not None:
        limit = check_int("limit", limit)
    positions = config.max_position_embeddings
    if context_length is None:
        context_length = max(MIN_CONTEXT, positions - ANSWER_ROOM)
    context_length = check_int(f"context_length (at least {MIN_CONTEXT} tokens)", context_length, MIN_CONTEXT)
    for task in task_names:
        if task in ruler.TASKS:
            ruler.check_length(tokenizer, task, context_length, positions)
    done = set(done)
    cells = {}
    for task in task_names:
        todo = []
        for name, ratio in configurations(methods, ratios):
            if (task, name, ratio) in done:
                continue
            try:
                sq.method_from_name(name, ratio, config.head_dim, context_length, grouped=config.grouped)
            except ValueError as err:
                if name != "flexgen":
                    raise
                tqdm.write(f"skipped {name} at {ratio:g}: {err}", file=sys.stderr)
                continue
            todo.append((name, ratio))
        if todo:
            cells[task] = todo
    if set(cells) & {"repetition", "bpc"} and heldout is None:
        heldout = text.heldout_text()
    samples, beyond = {}, []
    for task in cells:
        try:
            samples[task] = text.build_samples(tokenizer, task, limit or DEFAULT_N[task], context_length, seed, heldout)
        except ValueError as err:
            shortest = _shortest_context(tokenizer, task, context_length, max(positions, context_length), seed, heldout)
            fix = (f"use a context length of at least {shortest} tokens or leave {task} out" if shortest else
                   f"the model's max_position_embeddings={positions} is too short for it: leave {task} out")
            raise ValueError(f"context_length={context_length} is too short for task {task} with this "
                             f"tokenizer ({err}): {fix}") from None
        needed = positions_needed(model, task, samples[task], batch, bpc_tokens)
        if needed > positions:
            beyond.append((task, needed))
    if beyond and not beyond_positions:
        worst = max(n for _, n in beyond)
        raise ValueError(
            f"context_length={context_length}: {', '.join(f'{t} decodes up to {n} positions' for t, n in beyond)} "
            f"(prompt and decoded tokens), past the model's max_position_embeddings={positions}; use a context "
            f"length of at most {context_length - (worst - positions)}, or beyond_positions=True "
            f"(--beyond-positions) to decode past the positions the model was trained on")
    return Grid(context_length, cells, samples)


def _row(task: str, name: str, ratio: float, scores: list, moved: list, samples: list) -> dict:
    row = {"task": task, "method": name, "compression": ratio, "transfer_ratio": moved[0] / moved[1],
           "score": float(np.mean(scores)), "n": len(scores)}
    if task == "needle":         # the samples cycle through the depths: each depth's mean score
        depth_of = [text.NEEDLE_DEPTHS[i % len(text.NEEDLE_DEPTHS)] for i in range(len(samples))]
        row["by_depth"] = {f"{d:g}": float(np.mean([x for x, e in zip(scores, depth_of) if e == d]))
                           for d in sorted(set(depth_of))}
    return row


def evaluate(lm: LanguageModel, task_names, methods, ratios=COMPRESSION, limit: Optional[int] = None,
             context_length: Optional[int] = None, seed: int = 0, heldout: Optional[str] = None, batch: int = 16,
             progress: bool = True, done=(), on_result: Optional[Callable[[dict], None]] = None,
             bpc_tokens: int = BPC_SCORED, beyond_positions: bool = False, partial=None,
             on_progress: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Result rows {"task", "method", "compression", "transfer_ratio", "score", "n"} for the grid of
    tasks (prompts.TASKS) x methods (sq.METHOD_NAMES; dense once) x ratios.

    Per task and batch of samples: one dense prefill, then every method from it. limit: samples per
    task (default DEFAULT_N); context_length: prompt tokens (default max_position_embeddings -
    ANSWER_ROOM); heldout: the text of repetition and bpc (default prompts.heldout_text()). Cells in
    `done` ((task, method, compression) triples) are skipped; on_result(row) is called as soon as a
    cell is finished (to store it). A cell of several batches reports each batch before its last to
    on_progress(record) ({"task", "method", "compression", "n", "batch", "batches", "scores",
    "moved"}); `partial` ({cell triple: such a record}) resumes each cell after its recorded batches
    (a record of another n or batch size is ignored). Every check (prepare(): samples, budgets,
    context length and positions) runs before any model work; a method that cannot reach a ratio
    raises, except FlexGen below its floor of ~1/2, which is skipped with a note on stderr.
    beyond_positions=True lets rows go past max_position_embeddings.
    """
    grid = prepare(lm, task_names, methods, ratios, limit, context_length, seed, heldout, batch, done, bpc_tokens,
                   beyond_positions)
    plan, samples_of, context_length = grid.cells, grid.samples, grid.context_length
    d, grouped = lm.config.head_dim, lm.config.grouped
    results = []
    n_of = {t: len(samples_of[t]) for t in plan}
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
        scores, moved, kept = {}, {}, {}
        for c in cells:
            record = (partial or {}).get((task, *c))
            ok = record is not None and record.get("n") == len(samples) and record.get("batch") == batch
            scores[c], moved[c] = (list(record["scores"]), list(record["moved"])) if ok else ([], [0, 0])
            kept[c] = record["batches"] if ok else 0
        for index, b0 in enumerate(range(0, len(samples), batch)):
            todo = [c for c in cells if kept[c] <= index]
            if not todo:                                 # every cell stored past this batch
                bar.update(1 + len(cells))
                continue
            chunk = samples[b0:b0 + batch]
            bar.set_postfix_str(f"{task} prefill")
            prefilled = prefill_fn(lm, chunk, progress=lambda done, total, t0=time.perf_counter(): bar.set_postfix_str(
                f"{task} prefill {done}/{total} tok, {done / (time.perf_counter() - t0):.0f} tok/s"))
            bar.update(1 + len(cells) - len(todo))
            for name, ratio in todo:
                bar.set_postfix_str(f"{task} {name} {ratio:g}")
                method_of = functools.partial(sq.method_from_name, name, ratio, d, grouped=grouped)
                s, meter = run_fn(lm, chunk, lambda seq_len: method_of(seq_len), prefilled)
                scores[(name, ratio)].extend(s.tolist())
                moved[(name, ratio)][0] += meter.method_total
                moved[(name, ratio)][1] += meter.dense_total
                release_memory()
                bar.update()
                if b0 + batch >= len(samples):       # the cell is finished: out at once, to be stored
                    results.append(_row(task, name, ratio, scores[(name, ratio)], moved[(name, ratio)], samples))
                    if on_result is not None:
                        on_result(results[-1])
                elif on_progress is not None:         # a batch of it: stored too, so a rerun goes on from here
                    on_progress({"task": task, "method": name, "compression": ratio, "n": len(samples),
                                 "batch": batch, "batches": index + 1, "scores": list(scores[(name, ratio)]),
                                 "moved": list(moved[(name, ratio)])})
            del prefilled
            if bar.n and b0 == 0 and task == next(iter(plan)):
                tqdm.write(f"estimated time: {(time.time() - start) / bar.n * units / 60:.0f} min "
                           f"(from the first batch)", file=sys.stderr)
    bar.close()
    return results
