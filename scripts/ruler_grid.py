#!/usr/bin/env python
"""RULER on a model, every method from one dense prefill per batch (models.evaluation.harness, the
ruler runner pair), in rounds of samples so that a partial run already covers every task; then the
tables and the plot from what is there.

    python scripts/ruler_grid.py run --out /work/runs/ruler_qwen05b.jsonl          # resumable
    python scripts/ruler_grid.py report --out /work/runs/ruler_qwen05b.jsonl \
           --markdown /work/runs/ruler_qwen05b.md --plot /work/runs/ruler_qwen05b.png

`run` appends one JSON line per (length, task, samples [start, stop) (a batch of --batch rows within
a round), method, compression): the
samples' ids, scores and generations, the bytes read (method and dense), and the CPU and wall seconds
of its decode steps; and one line per prefill (method "prefill") with its CPU and wall seconds. Lines
already in the file are skipped, so a stopped run goes on where it stopped. The grid (GRID) is issue
30's: 4k all tasks n=10 (7 configurations), 8k all tasks n=5 (5), 16k four tasks n=5 (3); samples are
RULER's for seed 42 (the same as the JSONL export).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

ALL = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
       "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
# (length, tasks, rounds of sample ranges, configurations (method, compression))
GRID = (
    (4096, ALL, ((0, 2), (2, 6), (6, 10)),
     (("dense", 1.0), ("sparq", 1 / 4), ("sparq", 1 / 8), ("sparq", 1 / 16), ("sparq-logits", 1 / 8),
      ("h2o", 1 / 8), ("streaming", 1 / 8))),
    (8192, ALL, ((0, 2), (2, 5)),
     (("dense", 1.0), ("sparq", 1 / 8), ("sparq-logits", 1 / 8), ("h2o", 1 / 8), ("streaming", 1 / 8))),
    (16384, ("niah_single_2", "niah_multikey_2", "niah_multivalue", "vt"), ((0, 2), (2, 5)),
     (("dense", 1.0), ("sparq", 1 / 8), ("h2o", 1 / 8))),
)
SEED = 42


def _key(row) -> tuple:
    return row["length"], row["task"], row["start"], row["stop"], row["method"], row["compression"]


def read_rows(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:     # a line cut by a kill: run it again
                        pass
    return rows


def run(args) -> None:
    import jax

    import models
    import sparq_jax as sq
    from models.evaluation import harness, ruler

    lm = models.from_pretrained(args.model)
    grid = [g for g in GRID if g[0] in args.lengths]
    if args.tasks:                                     # a subset first (e.g. the tasks a peer runs)
        grid = [(n, tuple(t for t in tasks if t in args.tasks), rounds, configs) for n, tasks, rounds, configs in grid]
    for length, tasks, _, _ in grid:                   # every sample and length checked before model work
        for task in tasks:
            ruler.check_length(lm.tokenizer, task, length, lm.config.max_position_embeddings)
    done = {_key(r) for r in read_rows(args.out)}
    d, grouped = lm.config.head_dim, lm.config.num_key_value_heads < lm.config.num_attention_heads
    with open(args.out, "a") as out:
        def write(row):
            out.write(json.dumps(row) + "\n")
            out.flush()
        for length, tasks, rounds, configs in grid:
            batches = [(a, min(a + args.batch, stop)) for first, stop in rounds for a in range(first, stop, args.batch)]
            for start, stop in batches:
                for task in tasks:
                    todo = [(m, r) for m, r in configs if (length, task, start, stop, m, r) not in done]
                    if not todo:
                        continue
                    samples = ruler.build_samples(lm.tokenizer, task, max(b for _, b in batches), length, SEED)[start:stop]
                    c0, w0 = time.process_time(), time.time()
                    prefilled = ruler.prefill(lm, samples)
                    jax.block_until_ready(prefilled.state)          # JAX dispatches asynchronously
                    write({"length": length, "task": task, "start": start, "stop": stop, "method": "prefill",
                           "compression": 1.0, "cpu_s": time.process_time() - c0, "wall_s": time.time() - w0,
                           "tokens": int(prefilled.lengths.sum() + prefilled.forced.size)})
                    for name, ratio in todo:
                        c0, w0 = time.process_time(), time.time()
                        method_of = functools.partial(sq.method_from_name, name, ratio, d, grouped=grouped)
                        texts, meter = ruler.generate(lm, samples, method_of, prefilled)
                        row = {"length": length, "task": task, "start": start, "stop": stop, "method": name,
                               "compression": ratio, "ids": [s.id for s in samples],
                               "scores": [ruler.score(t, s.answers) for t, s in zip(texts, samples)],
                               "generated": texts, "answers": [list(s.answers) for s in samples],
                               "method_bytes": meter.method_total, "dense_bytes": meter.dense_total,
                               "cpu_s": time.process_time() - c0, "wall_s": time.time() - w0}
                        write(row)
                        harness.release_memory()
                        print(f"{length} {task} [{start},{stop}) {name} {ratio:g}: "
                              f"{np.mean(row['scores']):.2f} ({row['cpu_s']:.0f} cpu s)", file=sys.stderr, flush=True)
                    del prefilled
                    harness.release_memory()


def _label(method: str, ratio: float) -> str:
    return "dense" if method == "dense" else f"{method} 1/{round(1 / ratio)}"


def cells(rows) -> dict:
    """{(length, task, label): {"scores", "cpu_s", "method_bytes", "dense_bytes"}} over the sample rounds;
    prefill CPU seconds under the label "prefill"."""
    out = {}
    rows = list({_key(r): r for r in rows}.values())     # a prefill run again after a stop counts once
    for r in rows:
        label = "prefill" if r["method"] == "prefill" else _label(r["method"], r["compression"])
        c = out.setdefault((r["length"], r["task"], label), {"scores": [], "cpu_s": 0.0, "method_bytes": 0,
                                                             "dense_bytes": 0})
        c["scores"] += r.get("scores", [])
        c["cpu_s"] += r["cpu_s"]
        c["method_bytes"] += r.get("method_bytes", 0)
        c["dense_bytes"] += r.get("dense_bytes", 0)
    return out


def report(args) -> str:
    rows = read_rows(args.out)
    if not rows:
        raise SystemExit(f"error: --out {args.out} has no rows yet")
    table = cells(rows)
    lengths = sorted({k[0] for k in table})
    labels = [l for l in dict.fromkeys(_label(m, r) for g in GRID for m, r in g[3]) if any(k[2] == l for k in table)]
    def average(length, label):
        """(mean score over the tasks dense has at this length, complete?) or None."""
        tasks = [t for t in ALL if (length, t, "dense") in table]
        got = [table.get((length, t, label)) for t in tasks]
        if not any(got):
            return None
        full = all(c and len(c["scores"]) == len(table[(length, t, "dense")]["scores"]) for c, t in zip(got, tasks))
        return 100 * np.mean([np.mean(c["scores"]) for c in got if c]), full

    lines = ["#### RULER average by length (% of dense's in brackets; * over fewer tasks or samples than dense's)", "",
             "| method | " + " | ".join(f"{n // 1024}k" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for label in labels:
        marks = []
        for length in lengths:
            a, d = average(length, label), average(length, "dense")
            marks.append("-" if a is None else f"{a[0]:.1f}{'' if a[1] else '*'}"
                         + (f" ({100 * a[0] / d[0]:.0f}%)" if d and d[0] > 0 and label != "dense" else ""))
        lines.append(f"| {label} | " + " | ".join(marks) + " |")
    lines.append("")
    for length in lengths:
        tasks = [t for t in ALL if (length, t, "dense") in table]
        here = [l for l in labels if any((length, t, l) in table for t in tasks)]
        lines += [f"#### RULER at {length // 1024}k tokens (score in %, n per task in brackets)", "",
                  "| method | " + " | ".join(tasks) + " | average | transfer | CPU min |",
                  "|---" * (len(tasks) + 4) + "|"]
        for label in here:
            got = [table.get((length, t, label)) for t in tasks]
            marks = [f"{100 * np.mean(c['scores']):.0f} ({len(c['scores'])})" if c else "-" for c in got]
            full = all(c and len(c["scores"]) == len(table[(length, t, "dense")]["scores"]) for c, t in zip(got, tasks))
            avg = (f"{100 * np.mean([np.mean(c['scores']) for c in got]):.1f}" if full else
                   f"({100 * np.mean([np.mean(c['scores']) for c in got if c]):.1f})")
            moved = sum(c["method_bytes"] for c in got if c) / max(1, sum(c["dense_bytes"] for c in got if c))
            cpu = sum(c["cpu_s"] for c in got if c) / 60
            lines.append(f"| {label} | " + " | ".join(marks) + f" | {avg} | {moved:.3f} | {cpu:.1f} |")
        pre = sum(table[(length, t, "prefill")]["cpu_s"] for t in tasks if (length, t, "prefill") in table) / 60
        lines += ["", f"Shared dense prefills at {length // 1024}k: {pre:.1f} CPU min. An average in brackets is over "
                      f"fewer tasks or samples than dense's.", ""]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.plot:
        plot(table, lengths, labels, args.plot, args.title)
    return text


def plot(table, lengths, labels, path: str, title: str) -> None:
    """RULER average against length, per method: at each length over the grid's tasks there (16k: four),
    a point only where the method has every one of them (a length still running is left out)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in labels:
        pts = []
        for length in lengths:
            tasks = next((g[1] for g in GRID if g[0] == length), ())
            got = [table.get((length, t, label)) for t in tasks]
            if got and all(got):
                pts.append((length, 100 * np.mean([np.mean(c["scores"]) for c in got])))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label, color="k" if label == "dense" else None,
                    ls="--" if label == "dense" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
    ax.set_xlabel("max_seq_length (tokens)")
    ax.set_ylabel("RULER average (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def export(args) -> None:
    """The grid's samples as JSON lines (ruler.export_jsonl) for a peer such as kvpress: the model's
    tokenizer only, no weights read."""
    from models import hf
    from models.evaluation import ruler

    tokenizer = hf.open_checkpoint(args.model).tokenizer()
    tasks = args.tasks or list(ALL)
    for task in tasks:
        ruler.check_length(tokenizer, task, args.length)
    n = ruler.export_jsonl(args.out, tokenizer, tasks, args.limit, args.length, SEED)
    print(f"wrote {n} samples ({len(tasks)} tasks x {args.limit}, {args.length} tokens) to {args.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the grid (resumable)")
    r.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    r.add_argument("--batch", type=int, default=2, help="rows per prefill (default 2: a 4k prefill of 3 rows of the "
                                                         "0.5B model took 5.6 GB)")
    r.add_argument("--lengths", default="4096,8192,16384",
                   help="comma list of the GRID's lengths to run, in GRID order (default all)")
    r.add_argument("--tasks", nargs="+", choices=ALL, help="only these of the grid's tasks (default all)")
    t = sub.add_parser("report", help="tables (markdown) and the plot from the rows there")
    t.add_argument("--markdown")
    t.add_argument("--plot")
    t.add_argument("--title", default="RULER, Qwen2.5-Coder-0.5B-Instruct (fp32, CPU)")
    e = sub.add_parser("export", help="write the grid's samples (seed 42) as JSON lines for a peer (kvpress)")
    e.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    e.add_argument("--length", type=int, default=4096, help="tokens per prompt in the model's tokenizer")
    e.add_argument("--limit", type=int, default=10, help="samples per task (the first ones, as the grid's)")
    e.add_argument("--tasks", nargs="+", choices=ALL, help="default: all 11")
    for s in (r, t):
        s.add_argument("--out", required=True, help="the JSON-lines file of results")
    e.add_argument("--out", required=True, help="the JSON-lines file of samples to write")
    args = p.parse_args(argv)
    if args.command == "run":
        known = {g[0] for g in GRID}
        try:
            args.lengths = [int(x) for x in args.lengths.split(",")]
        except ValueError:
            p.error(f"--lengths must be a comma list of integers, got {args.lengths!r}")
        if set(args.lengths) - known:
            p.error(f"--lengths {args.lengths}: the grid has {sorted(known)}")
        run(args)
    elif args.command == "export":
        if args.limit < 1:
            p.error(f"--limit must be at least 1, got {args.limit}")
        export(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
