#!/usr/bin/env python
"""Offline evaluation: passkey and multi-key retrieval, repetition and held-out bits per character, for
dense attention and every sparse method at several transfer ratios (the paper's Figure 1, in miniature).

    python scripts/evaluate.py --model smollm2-135m-instruct --context-length 4096 --limit 20 \
           --json docs/results_smollm2.json --plot docs/results_smollm2.png     # resumable
    python scripts/evaluate.py --tasks passkey --methods dense,sparq --compression 1/8 --limit 8
    python scripts/evaluate.py                                   # everything, the bundled model

Protocol (every scored prediction comes out of a decode step run with the method under test; the
prompt's prefill is dense, as in the paper, and done once per batch of prompts for all methods):
- passkey: filler with a hidden 5-digit key; the question's tokens go through decode steps (so the
  method sees the question, as in Quest), then greedy decoding; exact match of the key.
- multikey: the same with several keys (a word and its own value each), one of them asked for.
- repetition: held-out text, a newline, then a span copied from inside it; the prompt's last token
  goes through a decode step, then greedy decoding until the output diverges from the text that
  really follows the span (score: characters matched, of 256).
- bpc: a held-out window; its last tokens (up to 256, at most half) are teacher-forced through
  decode steps, each step's logits scoring the next token; bits per character of that tail.
Lengths are in tokens of the model's tokenizer (the builders work in characters: the tokenizer's
characters per token on the task's text convert). The held-out texts are the public-domain plays in
models/bundled/heldout.
Methods: dense; sparq (the paper's setting for GQA models: no mean reallocation); sparq-mean (with
it); sparq-logits (no reallocation, KV groups ranked by summed approximate logits as the authors'
code does); h2o; streaming (LM-Infinite: 16 sink positions + a recent window); flexgen (only at
ratios >= its floor of ~1/2). Each is built with Cls.for_compression(ratio, head_dim, cache length)
(for bpc, the mean cache length over the scored steps); the row's transfer_ratio is measured: the
sum over decode steps and rows of method.transfers(S, D) over the same sum for dense, S being the
row's cache length at that step (the same for every layer).
"""
from __future__ import annotations

import argparse
import functools
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
from sparq_jax.methods import transfer_totals  # noqa: E402
from models.cli import positive_int, ratio_list  # noqa: E402

TASKS = ("passkey", "multikey", "repetition", "bpc")
METHODS = ("dense", "sparq", "sparq-mean", "sparq-logits", "h2o", "streaming", "flexgen")
COMPRESSION = (1 / 2, 1 / 4, 1 / 8, 1 / 16)
# Samples per task unless --limit says otherwise: a few minutes of CPU for the bundled model's grid.
DEFAULT_N = {"passkey": 40, "multikey": 40, "repetition": 32, "bpc": 16}
SCORE_LABEL = {"passkey": "passkey accuracy", "multikey": "multi-key accuracy", "repetition": "characters matched",
               "bpc": "bits per character (lower is better)"}
MULTIKEY_KEYS = 3          # keys hidden per multi-key prompt (with 4 at ~3.7k tokens SmolLM2-135M found 4 of 8)
BPC_SCORED = 256           # tokens of each bpc window scored through decode steps (at most half)
HELDOUT = os.path.join(models.BUNDLED, "heldout")


def build_method(name: str, ratio: float, head_dim: int, seq_len: int):
    """The method `name` at transfer ratio `ratio` for prompts of seq_len tokens (dense ignores it)."""
    if name == "dense":
        return sq.Dense()
    if name in ("sparq", "sparq-mean", "sparq-logits"):
        return sq.SparQ.for_compression(ratio, head_dim, seq_len, reallocate_mean=name == "sparq-mean",
                                        group_scores="logits" if name == "sparq-logits" else "softmax")
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
        method_total, dense_total = transfer_totals(self.method, lengths.tolist(), self.head_dim)
        self.method_total += method_total
        self.dense_total += dense_total

    @property
    def ratio(self) -> float:
        return self.method_total / self.dense_total


# ---------------------------------------------------------------------------------------------
# Text <-> tokens

def encode(lm, text: str) -> list[int]:
    """text's token ids with the model's own tokenizer, no special tokens."""
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(lm, ids) -> str:
    return lm.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def _prefix(lm) -> list[int]:
    """What the tokenizer puts before a text (<s> for the bundled model, nothing for SmolLM2)."""
    return list(lm.tokenizer("")["input_ids"])


def chars_per_token(lm, text: str) -> float:
    return len(text) / max(1, len(encode(lm, text)))


def _left_pad(rows: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Model-facing loops. Each task has prefill_<task>(lm, samples) -> Prefilled, computed once per batch
# and shared by every method, and run_<task>(lm, samples, method_of, prefilled) -> (scores, Transfers),
# where method_of(seq_len) builds the method for the batch's cache length.

class Prefilled:
    """One dense prefill (K^T kept for SparQ, H2O's scores seeded): state, each row's length, the
    tokens each row still feeds through decode steps before generating ([B, F], F the same for all),
    and what the task needs to score."""

    def __init__(self, lm, prompts: list[list[int]], forced: int, extra: int, **info):
        if forced < 1 or min(map(len, prompts)) <= forced:
            raise ValueError(f"every prompt needs more than {forced} tokens")
        pad = lm.pad_token_id if lm.pad_token_id is not None else 0
        ids, mask = _left_pad([p[:-forced] for p in prompts], pad)
        max_len = ids.shape[1] + forced + extra
        _, self.state = lm.prefill(ids, mask, max_len=max_len, method=sq.H2O(1, 0), transposed_keys=True)
        self.lengths = mask.sum(axis=1)
        self.forced = np.asarray([p[-forced:] for p in prompts], np.int32)
        self.info = info

    def fresh(self):
        # decode_step donates its state, so each method decodes from its own copy of the prefill.
        return jax.tree.map(jnp.copy, self.state), self.lengths.copy()


@jax.jit
def _token_nll(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]


def _greedy(logits) -> np.ndarray:
    return np.asarray(jnp.argmax(logits, axis=-1)).astype(np.int32)


def _force(lm, prefilled: Prefilled, method_of):
    """Feed each row's forced tokens through decode steps -> (logits of the last, state, lengths, method, meter)."""
    state, lengths = prefilled.fresh()
    forced = prefilled.forced
    method = method_of(int(lengths.max()) + forced.shape[1])
    meter = Transfers(method, lm.config.head_dim)
    for j in range(forced.shape[1]):
        lengths = lengths + 1
        meter.step(lengths)
        logits, state = lm.decode_step(forced[:, j], state, method=method)
    return logits, state, lengths, method, meter


def prefill_passkey(lm, samples: list[tasks.PasskeySample]) -> Prefilled:
    """Passkey and multi-key: the question's tokens (as many as the shortest question has) go through
    decode steps, so the method sees the question, as in Quest; the rest is prefilled."""
    prompts = [_prefix(lm) + encode(lm, s.context + s.question) for s in samples]
    forced = min(len(encode(lm, s.question)) for s in samples)
    new = max(len(encode(lm, s.answer)) for s in samples) + 2
    return Prefilled(lm, prompts, forced, new, new_tokens=new)


def run_passkey(lm, samples: list[tasks.PasskeySample], method_of, prefilled: Prefilled):
    """-> (scores [n], Transfers): greedy tokens after the question; exact match of the key."""
    logits, state, lengths, method, meter = _force(lm, prefilled, method_of)
    out = []
    for j in range(prefilled.info["new_tokens"]):
        token = _greedy(logits)
        out.append(token)
        if j + 1 < prefilled.info["new_tokens"]:
            lengths = lengths + 1
            meter.step(lengths)
            logits, state = lm.decode_step(token, state, method=method)
    generated = np.stack(out, axis=1)
    scores = [tasks.score_passkey(decode(lm, g).lstrip(), s.answer) for g, s in zip(generated, samples)]
    return np.asarray(scores, np.float64), meter


def prefill_repetition(lm, samples: list[tasks.RepetitionSample]) -> Prefilled:
    # The prompt's last token goes through a decode step, so the first scored character is sparse too.
    prompts = [_prefix(lm) + encode(lm, s.prompt) for s in samples]
    new = max(len(encode(lm, s.target)) for s in samples) + 4
    return Prefilled(lm, prompts, 1, new, new_tokens=new)


def _still_matching(text: str, target: str) -> bool:
    n = min(len(text), len(target))
    return text[:n] == target[:n] and len(text) < len(target)


def run_repetition(lm, samples: list[tasks.RepetitionSample], method_of, prefilled: Prefilled):
    """-> (characters matched [n], Transfers): greedy decoding until every row has diverged from the
    text that really follows the span (or has matched all of it)."""
    logits, state, lengths, method, meter = _force(lm, prefilled, method_of)
    generated = [[] for _ in samples]
    alive = np.ones(len(samples), bool)
    for j in range(prefilled.info["new_tokens"]):
        token = _greedy(logits)
        for i in np.flatnonzero(alive):
            generated[i].append(int(token[i]))
            alive[i] = _still_matching(decode(lm, generated[i]), samples[i].target)
        # Later characters cannot change a score once every row has diverged.
        if not alive.any() or j + 1 == prefilled.info["new_tokens"]:
            break
        lengths = lengths + 1
        meter.step(lengths)
        logits, state = lm.decode_step(token, state, method=method)
    scores = [tasks.score_repetition(decode(lm, g), s.target) for g, s in zip(generated, samples)]
    return np.asarray(scores, np.float64), meter


def prefill_bpc(lm, windows: list[str], scored: int = BPC_SCORED) -> Prefilled:
    """Each window's tokens (cut to the shortest window's count): all but the last scored + 1 are
    prefilled; the rest are teacher-forced through decode steps, each step's logits scoring the next."""
    rows = [_prefix(lm) + encode(lm, w) for w in windows]
    width = min(map(len, rows))
    scored = min(scored, width // 2)
    rows = [r[:width] for r in rows]
    chars = [len(decode(lm, r[width - scored:])) for r in rows]
    return Prefilled(lm, rows, scored + 1, 0, chars=chars)


def run_bpc(lm, windows: list[str], method_of, prefilled: Prefilled):
    """-> (bits per char of each window's scored tail, Transfers)."""
    state, lengths = prefilled.fresh()
    forced = prefilled.forced
    steps = forced.shape[1] - 1
    # S grows over the scored steps while the budget stays fixed: size the budget at the mean length.
    method = method_of(int(lengths.max()) + steps // 2 + 1)
    meter = Transfers(method, lm.config.head_dim)
    nats = np.zeros(len(forced), np.float64)
    for j in range(steps):
        lengths = lengths + 1
        meter.step(lengths)
        logits, state = lm.decode_step(forced[:, j], state, method=method)
        nats += np.asarray(_token_nll(logits, jnp.asarray(forced[:, j + 1])), np.float64)
    return np.asarray([tasks.bits_per_char(x, c) for x, c in zip(nats, prefilled.info["chars"])]), meter


RUNNERS = {"passkey": (prefill_passkey, run_passkey), "multikey": (prefill_passkey, run_passkey),
           "repetition": (prefill_repetition, run_repetition), "bpc": (prefill_bpc, run_bpc)}


# ---------------------------------------------------------------------------------------------
# The grid

def heldout_text(folder: str = HELDOUT) -> str:
    """The public-domain held-out texts (models/bundled/heldout/*.txt by default), joined."""
    paths = sorted(glob.glob(os.path.join(folder, "*.txt")))
    if not paths:
        raise ValueError(f"{folder!r} has no *.txt texts for the repetition and bpc tasks")
    texts = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            texts.append(f.read())
    return "\n\n".join(texts)


def build_samples(lm, task: str, n: int, context_length: int, seed: int, heldout: str | None):
    """n samples of about context_length tokens (lengths are set in characters, from the tokenizer's
    characters per token on the task's own text)."""
    if task in ("passkey", "multikey"):
        chars = int(context_length * chars_per_token(lm, tasks.PASSKEY_FILLER * 8))
        if task == "passkey":
            return tasks.passkey_samples(n, chars, seed)
        return tasks.multikey_samples(n, chars, seed, keys=MULTIKEY_KEYS)
    chars = int(context_length * chars_per_token(lm, heldout[:20000]))
    if task == "repetition":
        return tasks.repetition_samples(heldout, n, chars, seed)
    return tasks.bpc_windows(heldout, n, chars, seed)


def configurations(methods, ratios):
    """(method, ratio) pairs of the grid; dense once, at ratio 1."""
    out = []
    for m in methods:
        if m == "dense":
            out.append((m, 1.0))
        else:
            out.extend((m, r) for r in ratios)
    return out


def evaluate(lm, task_names, methods, ratios, limit=None, context_length=None, seed=0, heldout=None,
             batch=16, progress=True, done=(), on_result=None, bpc_tokens=BPC_SCORED):
    """Result rows {"task", "method", "compression", "transfer_ratio", "score", "n"} for the grid.

    Per task and batch of samples: one dense prefill, then every method from it. Cells in `done`
    ((task, method, compression) triples) are skipped; on_result(row) is called as each row is ready
    (to save progress). Configurations a method cannot reach (FlexGen below 1/2) are skipped with a
    note on stderr.
    """
    context_length = context_length or lm.config.max_position_embeddings
    d = lm.config.head_dim
    done = set(done)
    results = []
    plan = {}
    for task in task_names:
        cells = []
        for name, ratio in configurations(methods, ratios):
            if (task, name, ratio) in done:
                continue
            try:
                build_method(name, ratio, d, context_length)
            except ValueError as err:
                if name != "flexgen":
                    raise
                tqdm.write(f"skipped {name} at {ratio:g}: {err}", file=sys.stderr)
                continue
            cells.append((name, ratio))
        if cells:
            plan[task] = cells
    n_of = {t: limit or DEFAULT_N[t] for t in plan}
    samples_of = {t: build_samples(lm, t, n_of[t], context_length, seed, heldout) for t in plan}  # errors first
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
            prefilled = prefill_fn(lm, chunk)
            bar.update()
            for name, ratio in cells:
                bar.set_postfix_str(f"{task} {name} {ratio:g}")
                s, meter = run_fn(lm, chunk, lambda seq_len: build_method(name, ratio, d, seq_len), prefilled)
                scores[(name, ratio)].extend(s.tolist())
                moved[(name, ratio)][0] += meter.method_total
                moved[(name, ratio)][1] += meter.dense_total
                # Each method is its own compile, and XLA:CPU's executables of a decode step keep
                # memory that grows with the cache (about 1.3 GB each at 10 rows x 2k tokens of
                # SmolLM2): without this a grid of 16 cells ran out of 24 GB.
                jax.clear_caches()
                bar.update()
            del prefilled
            if bar.n and b0 == 0 and task == next(iter(plan)):
                tqdm.write(f"estimated time: {(time.time() - start) / bar.n * units / 60:.0f} min "
                           f"(from the first batch)", file=sys.stderr)
        for name, ratio in cells:
            row = {"task": task, "method": name, "compression": ratio,
                   "transfer_ratio": moved[(name, ratio)][0] / moved[(name, ratio)][1],
                   "score": float(np.mean(scores[(name, ratio)])), "n": len(scores[(name, ratio)])}
            results.append(row)
            if on_result is not None:
                on_result(row)
    bar.close()
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
    styles = {"sparq": ("C0", "o"), "sparq-mean": ("C9", "s"), "sparq-logits": ("C4", "P"), "h2o": ("C1", "^"),
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
        if task in ("passkey", "multikey"):
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
    p.add_argument("--model", default="bundled", help="a checkpoint folder, a .gguf file, a known name "
                                                       "(smollm2-135m-instruct) or bundled (default: bundled)")
    p.add_argument("--tasks", type=_list(TASKS, "tasks"), default=list(TASKS), help=f"comma list of {TASKS}")
    p.add_argument("--methods", type=_list(METHODS, "methods"), default=list(METHODS),
                   help=f"comma list of {METHODS}")
    p.add_argument("--compression", type=ratio_list, default=list(COMPRESSION),
                   help="target transfer ratios, comma list (0.125 or 1/8); default 1/2,1/4,1/8,1/16")
    p.add_argument("--limit", type=positive_int, help=f"samples per task (default {DEFAULT_N})")
    p.add_argument("--context-length", type=positive_int,
                   help="prompt tokens per sample (default: the model's max_position_embeddings)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task builders")
    p.add_argument("--batch", type=positive_int, default=16, help="rows per prefill / decode batch (default 16)")
    p.add_argument("--bpc-tokens", type=positive_int, default=BPC_SCORED,
                   help=f"bpc: tokens of each window scored through decode steps (default {BPC_SCORED}, at most "
                        f"half the window)")
    p.add_argument("--heldout", default=HELDOUT, help="folder of *.txt held-out texts for repetition and bpc "
                                                      "(default: the plays shipped in models/bundled/heldout)")
    p.add_argument("--json", help="write the results here as JSON; if it exists with the same model, "
                                  "context length and seed, its cells are kept and not run again")
    p.add_argument("--plot", help="write a PNG of score vs measured transfer ratio here")
    return p, p.parse_args(argv)


def _resume(path, header) -> list:
    """The result rows of an earlier run written to `path` with the same header, else []."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        data = json.load(f)
    if any(data.get(k) != v for k, v in header.items()):
        raise SystemExit(f"error: --json {path} holds a run with other settings "
                         f"({', '.join(f'{k}={data.get(k)!r}' for k in header)}); choose another file")
    return data.get("results", [])


def _write(path, header, rows) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**header, "results": rows}, f, indent=2)
    os.replace(tmp, path)     # never half-written


def main(argv=None):
    parser, args = parse_args(argv)
    if args.context_length is not None and args.context_length < 64:
        parser.error(f"--context-length must be >= 64, got {args.context_length}")
    heldout = None
    if set(args.tasks) & {"repetition", "bpc"}:
        try:
            heldout = heldout_text(args.heldout)
        except ValueError as err:
            parser.error(f"--heldout: {err}")
    try:
        lm = models.from_pretrained(args.model)
    except ValueError as err:
        parser.error(f"--model {args.model!r}: {err}")
    if lm.tokenizer is None:
        parser.error(f"--model {args.model!r} has no tokenizer")
    ctx = args.context_length or lm.config.max_position_embeddings
    if ctx > lm.config.max_position_embeddings:
        parser.error(f"--context-length {ctx} exceeds the model's max_position_embeddings "
                     f"{lm.config.max_position_embeddings}")
    header = {"model": args.model, "context_length": ctx, "seed": args.seed}
    rows = _resume(args.json, header)
    if rows:
        print(f"resuming {args.json}: {len(rows)} cells kept", file=sys.stderr)
    start = time.time()

    def save(row):
        rows.append(row)
        if args.json:
            _write(args.json, header, rows)

    evaluate(lm, args.tasks, args.methods, args.compression, args.limit, ctx, args.seed, heldout,
             batch=args.batch, done={(r["task"], r["method"], r["compression"]) for r in rows}, on_result=save,
             bpc_tokens=args.bpc_tokens)
    wanted = {(t, m, r) for t in args.tasks for m, r in configurations(args.methods, args.compression)}
    results = [r for r in rows if (r["task"], r["method"], r["compression"]) in wanted]
    print(format_table(results))
    print(f"({time.time() - start:.0f} s, context {ctx} tokens, seed {args.seed})")
    if args.json:
        _write(args.json, header, rows)
    if args.plot:
        name = os.path.basename(os.path.normpath(args.model))
        plot(results, args.plot, f"{name}: context {ctx} tokens, seed {args.seed}")
    return results


if __name__ == "__main__":
    main()
