#!/usr/bin/env python
"""Offline evaluation: passkey retrieval, repetition and held-out bits per character, for dense
attention and every sparse method at several transfer ratios (the paper's Figure 1, in miniature).

    python scripts/evaluate.py                                   # everything, the bundled model
    python scripts/evaluate.py --tasks passkey --methods dense,sparq --compression 1/8 --limit 8
    python scripts/evaluate.py --json docs/results.json --plot docs/results.png

Protocol (every scored prediction comes out of a decode step run with the method under test; the
prompt's prefill is dense, as in the paper):
- passkey: prefill the filler and the hidden key, feed the question token by token through
  decode_step (so the method sees the question, as in Quest), then greedy-decode 5 digits; exact match.
- repetition: prefill the prompt but its last token, feed that token, then greedy-decode until the
  output diverges from the 256 characters that really follow the span (score: characters matched).
- bpc: prefill the first half of a held-out window, then teacher-force the rest through decode_step;
  bits per character of every later character.
Methods: dense; sparq (the paper's setting for GQA models: no mean reallocation); sparq-mean (with
it); h2o; streaming (LM-Infinite: 16 sink positions + a recent window); flexgen (only at ratios >= its
floor of ~1/2). Each is built with Cls.for_compression(ratio, head_dim, prompt length) (for bpc, the
mean cache length over the scored steps, as the cache doubles while it is scored); the row's
transfer_ratio is measured: the sum over decode steps and rows of method.transfers(S, D) over the
same sum for dense, S being the row's cache length at that step (the same for every layer).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402
import sparq_jax as sq  # noqa: E402
from sparq_jax import tasks  # noqa: E402
from cli_args import positive_int, ratio_list  # noqa: E402

TASKS = ("passkey", "repetition", "bpc")
METHODS = ("dense", "sparq", "sparq-mean", "h2o", "streaming", "flexgen")
COMPRESSION = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
# Samples per task unless --limit says otherwise: a few minutes of CPU for the whole grid.
DEFAULT_N = {"passkey": 40, "repetition": 32, "bpc": 16}
SCORE_LABEL = {"passkey": "passkey accuracy", "repetition": "characters matched",
               "bpc": "bits per character (lower is better)"}


def build_method(name: str, ratio: float, head_dim: int, seq_len: int):
    """The method `name` at transfer ratio `ratio` for prompts of seq_len tokens (dense ignores it)."""
    if name == "dense":
        return sq.Dense()
    if name in ("sparq", "sparq-mean"):
        return sq.SparQ.for_compression(ratio, head_dim, seq_len, reallocate_mean=name == "sparq-mean")
    cls = {"h2o": sq.H2O, "streaming": sq.Streaming, "flexgen": sq.FlexGen}[name]
    return cls.for_compression(ratio, head_dim, seq_len)


class Transfers:
    """Sum of elements read per KV head (the method's and dense attention's) over decode steps and rows."""

    def __init__(self, method, head_dim: int):
        self.method, self.head_dim = method, head_dim
        self.method_total = 0
        self.dense_total = 0

    def step(self, lengths: np.ndarray) -> None:
        """lengths [B]: each row's cache length during the step (its new token included)."""
        for s in lengths.tolist():
            self.method_total += self.method.transfers(int(s), self.head_dim)
            self.dense_total += sq.Dense().transfers(int(s), self.head_dim)

    @property
    def ratio(self) -> float:
        return self.method_total / self.dense_total


# ---------------------------------------------------------------------------------------------
# Model-facing loops

def encode(lm, text: str) -> list[int]:
    """<s> + the bytes of text (the bundled tokenizer's encoding, without its per-call overhead)."""
    ids = list(text.encode("utf-8"))
    if lm.config.vocab_size < 256:
        raise ValueError("the evaluation tasks need a byte-level model (vocab_size >= 256)")
    return ids


def _bos(lm) -> list[int]:
    return [] if lm.config.bos_token_id is None else [int(lm.config.bos_token_id)]


def _left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


def _prefill(lm, rows: list[list[int]], max_len: int):
    """One dense prefill shared by every method: keeps K^T (SparQ) and H2O's seed scores."""
    pad = lm.pad_token_id if lm.pad_token_id is not None else 0
    ids, mask = _left_pad(rows, pad)
    _, state = lm.prefill(ids, mask, max_len=max_len, method=sq.H2O(1, 0), transposed_keys=True)
    return state, mask.sum(axis=1)


def _fresh(state):
    # decode_step donates its state, so each method decodes from its own copy of the prefill.
    return jax.tree.map(jnp.copy, state)


@jax.jit
def _token_nll(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


def prefill_passkey(lm, samples: list[tasks.PasskeySample]):
    contexts = [_bos(lm) + encode(lm, s.context) for s in samples]
    max_len = max(map(len, contexts)) + len(encode(lm, samples[0].question)) + tasks.PASSKEY_DIGITS
    return _prefill(lm, contexts, max_len)


def run_passkey(lm, samples: list[tasks.PasskeySample], method_of, prefilled):
    """-> (scores [n], Transfers). method_of(prompt_len) builds the method; prefilled is
    prefill_passkey's (state, lengths), shared by every method."""
    questions = [encode(lm, s.question) for s in samples]
    if len({len(q) for q in questions}) != 1:
        raise ValueError("passkey questions must all have the same length")
    n_q = len(questions[0])
    state, lengths = _fresh(prefilled[0]), prefilled[1]
    method = method_of(int(lengths.max()) + n_q)
    meter = Transfers(method, lm.config.head_dim)
    q = np.asarray(questions, np.int32)
    for j in range(n_q):
        lengths = lengths + 1
        meter.step(lengths)
        logits, state = lm.decode_step(q[:, j], state, method=method)
    out = []
    for j in range(tasks.PASSKEY_DIGITS):
        token = np.asarray(jnp.argmax(logits, axis=-1)).astype(np.int32)
        out.append(token)
        if j + 1 < tasks.PASSKEY_DIGITS:
            lengths = lengths + 1
            meter.step(lengths)
            logits, state = lm.decode_step(token, state, method=method)
    generated = np.stack(out, axis=1)
    scores = [tasks.score_passkey(_decode_bytes(g), s.answer) for g, s in zip(generated, samples)]
    return np.asarray(scores, np.float64), meter


def prefill_repetition(lm, samples: list[tasks.RepetitionSample]):
    prompts = [_bos(lm) + encode(lm, s.prompt) for s in samples]
    max_len = max(map(len, prompts)) + max(len(encode(lm, s.target)) for s in samples)
    # The prompt's last token goes through a decode step, so the first scored character is sparse too.
    return _prefill(lm, [p[:-1] for p in prompts], max_len)


def run_repetition(lm, samples: list[tasks.RepetitionSample], method_of, prefilled):
    """-> (characters matched [n], Transfers)."""
    prompts = [_bos(lm) + encode(lm, s.prompt) for s in samples]
    targets = [encode(lm, s.target) for s in samples]
    n_gen = max(map(len, targets))
    state, lengths = _fresh(prefilled[0]), prefilled[1]
    method = method_of(int(lengths.max()) + 1)
    meter = Transfers(method, lm.config.head_dim)
    target = np.full((len(samples), n_gen), -1, np.int64)
    for i, t in enumerate(targets):
        target[i, :len(t)] = t
    matched = np.zeros(len(samples), np.int64)
    alive = np.ones(len(samples), bool)
    token = np.asarray([p[-1] for p in prompts], np.int32)
    for j in range(n_gen):
        lengths = lengths + 1
        meter.step(lengths)
        logits, state = lm.decode_step(token, state, method=method)
        token = np.asarray(jnp.argmax(logits, axis=-1)).astype(np.int32)
        alive &= token == target[:, j]
        matched += alive
        # Later characters cannot change a score once every row has diverged.
        if not alive.any():
            break
    return matched.astype(np.float64), meter


def _bpc_rows(lm, windows: list[str]) -> np.ndarray:
    rows = [_bos(lm) + encode(lm, w) for w in windows]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("bpc windows must all have the same length")
    return np.asarray(rows, np.int32)


def prefill_bpc(lm, windows: list[str]):
    full = _bpc_rows(lm, windows)
    return _prefill(lm, full[:, :full.shape[1] // 2].tolist(), full.shape[1])


def run_bpc(lm, windows: list[str], method_of, prefilled):
    """-> (bits per char of each window's second half, Transfers)."""
    full = _bpc_rows(lm, windows)
    half = full.shape[1] // 2
    state, lengths = _fresh(prefilled[0]), prefilled[1]
    # S grows from half the window to all of it while the budget stays fixed: size the budget at
    # the mean length over the scored steps, so the measured ratio lands near the target.
    method = method_of(int(lengths.max()) + (full.shape[1] - half) // 2)
    meter = Transfers(method, lm.config.head_dim)
    nats = np.zeros(len(full), np.float64)
    for j in range(half, full.shape[1] - 1):
        lengths = lengths + 1
        meter.step(lengths)
        logits, state = lm.decode_step(full[:, j], state, method=method)
        nats += np.asarray(_token_nll(logits, jnp.asarray(full[:, j + 1])), np.float64)
    chars = full.shape[1] - 1 - half
    return np.asarray([tasks.bits_per_char(x, chars) for x in nats]), meter


def _decode_bytes(ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# The grid

def read_heldout(model_path: str) -> str:
    """The held-out texts shipped with a model (its heldout/*.txt), joined."""
    paths = sorted(glob.glob(os.path.join(model_path, "heldout", "*.txt")))
    if not paths:
        raise ValueError(f"--model {model_path!r} has no heldout/*.txt texts for the repetition and bpc tasks")
    texts = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


def build_samples(task: str, n: int, context_length: int, seed: int, heldout: str | None):
    """Each task's samples for a context of context_length tokens (<s> included)."""
    if task == "passkey":
        return tasks.passkey_samples(n, context_length - 1, seed)
    if task == "repetition":
        return tasks.repetition_samples(heldout, n, context_length - 1, seed)
    return tasks.bpc_windows(heldout, n, context_length - 1, seed)


RUNNERS = {"passkey": (prefill_passkey, run_passkey), "repetition": (prefill_repetition, run_repetition),
           "bpc": (prefill_bpc, run_bpc)}


def configurations(methods, ratios):
    """(method name, target ratio) pairs in display order: dense once, at ratio 1."""
    out = []
    for m in methods:
        if m == "dense":
            out.append((m, 1.0))
        else:
            out.extend((m, r) for r in ratios)
    return out


def evaluate(lm, task_names, methods, ratios, limit=None, context_length=None, seed=0, heldout=None,
             batch=64, progress=True):
    """Result rows {"task", "method", "compression", "transfer_ratio", "score", "n"} for the grid.

    Configurations a method cannot reach (FlexGen below 1/2) are skipped with a note on stderr.
    """
    context_length = context_length or lm.config.max_position_embeddings
    d = lm.config.head_dim
    results = []
    work = [(t, m, r) for t in task_names for m, r in configurations(methods, ratios)]
    bar = tqdm(work, desc="evaluate", dynamic_ncols=True, disable=not progress, file=sys.stderr)
    prefills = {}
    samples = {t: build_samples(t, limit or DEFAULT_N[t], context_length, seed, heldout) for t in task_names}
    for task, name, ratio in bar:
        bar.set_postfix_str(f"{task} {name} {ratio:g}")
        try:
            build_method(name, ratio, d, context_length)
        except ValueError as err:
            if name == "flexgen":
                tqdm.write(f"skipped {name} at {ratio:g}: {err}", file=sys.stderr)
                continue
            raise
        scores, moved = [], []
        items = samples[task]
        for b0 in range(0, len(items), batch):
            chunk = items[b0:b0 + batch]
            prefill_fn, run_fn = RUNNERS[task]
            if (task, b0) not in prefills:
                # Prefill is dense for every method: compute it once per batch and copy it per method.
                prefills = {(task, b0): prefill_fn(lm, chunk)}
            s, meter = run_fn(lm, chunk, lambda seq_len: build_method(name, ratio, d, seq_len),
                              prefills[(task, b0)])
            scores.extend(s.tolist())
            moved.append((meter.method_total, meter.dense_total))
        ratio_measured = sum(m for m, _ in moved) / sum(dn for _, dn in moved)
        results.append({"task": task, "method": name, "compression": ratio,
                        "transfer_ratio": ratio_measured, "score": float(np.mean(scores)), "n": len(scores)})
    return results


# ---------------------------------------------------------------------------------------------
# Output

def format_table(results) -> str:
    lines = [f"{'task':<11} {'method':<11} {'compression':>11} {'transfer':>9} {'score':>9} {'n':>4}"]
    for r in results:
        lines.append(f"{r['task']:<11} {r['method']:<11} {r['compression']:>11.4g} {r['transfer_ratio']:>9.4f} "
                     f"{r['score']:>9.4g} {r['n']:>4}")
    return "\n".join(lines)


def plot(results, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(1, len(task_names), figsize=(4.6 * len(task_names), 3.8), squeeze=False)
    styles = {"sparq": ("C0", "o"), "sparq-mean": ("C9", "s"), "h2o": ("C1", "^"),
              "streaming": ("C2", "v"), "flexgen": ("C3", "D")}
    for ax, task in zip(axes[0], task_names):
        rows = [r for r in results if r["task"] == task]
        for r in rows:
            if r["method"] == "dense":
                ax.axhline(r["score"], color="k", ls="--", lw=1, label="dense")
        for name in dict.fromkeys(r["method"] for r in rows):
            if name == "dense":
                continue
            pts = sorted((r["transfer_ratio"], r["score"]) for r in rows if r["method"] == name)
            color, marker = styles.get(name, (None, "o"))
            ax.plot(*zip(*pts), marker=marker, color=color, label=name)
        if task == "passkey":
            ax.set_ylim(-0.05, 1.05)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("transfer ratio (measured)")
        ax.set_ylabel(SCORE_LABEL[task])
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI

def _list(choices, what):
    def parse(text):
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"--{what} must be a comma list of {', '.join(choices)}; got {text!r}")
        return list(dict.fromkeys(items))
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled", help="checkpoint folder with a byte-level tokenizer and "
                                                       "heldout/*.txt (default: bundled, the small model)")
    p.add_argument("--tasks", type=_list(TASKS, "tasks"), default=list(TASKS), help=f"comma list of {TASKS}")
    p.add_argument("--methods", type=_list(METHODS, "methods"), default=list(METHODS),
                   help=f"comma list of {METHODS}")
    p.add_argument("--compression", type=ratio_list, default=list(COMPRESSION),
                   help="target transfer ratios, comma list (0.125 or 1/8); default 1/2,1/4,1/8,1/16")
    p.add_argument("--limit", type=positive_int, help=f"samples per task (default {DEFAULT_N})")
    p.add_argument("--context-length", type=positive_int,
                   help="prompt tokens per sample (default: the model's max_position_embeddings)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task builders")
    p.add_argument("--batch", type=positive_int, default=64, help="rows per prefill / decode batch")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--plot", help="write a PNG of score vs measured transfer ratio here")
    return p, p.parse_args(argv)


def main(argv=None):
    parser, args = parse_args(argv)
    if args.model == "bundled":
        args.model = models.BUNDLED
    if not os.path.isdir(args.model):
        parser.error(f"--model {args.model!r} is not a checkpoint folder")
    lm = models.from_pretrained(args.model)
    ctx = args.context_length or lm.config.max_position_embeddings
    if ctx > lm.config.max_position_embeddings:
        parser.error(f"--context-length {ctx} exceeds the model's max_position_embeddings "
                     f"{lm.config.max_position_embeddings}")
    heldout = read_heldout(args.model) if set(args.tasks) & {"repetition", "bpc"} else None
    start = time.time()
    results = evaluate(lm, args.tasks, args.methods, args.compression, args.limit, ctx, args.seed, heldout,
                       batch=args.batch)
    print(format_table(results))
    print(f"({time.time() - start:.0f} s, context {ctx} tokens, seed {args.seed})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "results": results}, f, indent=2)
    if args.plot:
        plot(results, args.plot, f"{os.path.basename(os.path.normpath(args.model))}: context {ctx}, seed {args.seed}")
    return results


if __name__ == "__main__":
    main()
