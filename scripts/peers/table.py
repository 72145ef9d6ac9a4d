"""The README's kvpress table from the result files: our harness's RULER runs (scripts/ruler_grid.py's
JSONL) next to kvpress's presses (scripts/peers/kvpress_ruler.py's results.jsonl), per task and
averaged, with n and CPU time, then the dense agreement (our dense vs kvpress/transformers dense on
the same samples) and the samples where they disagree.

    python scripts/peers/table.py --ours /work/runs/ruler_qwen05b.jsonl \
        --peer /work/runs/kvpress/results.jsonl --markdown /work/runs/kvpress/table.md

Runs in sparq-jax's own environment (numpy and lm-eval, no torch or kvpress): it rescores every
kvpress answer with lm-eval's own RULER string match (lm_eval/tasks/ruler/common_utils.py) and stops
if that differs from the score the peer script recorded with its transcription.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

TASKS = ("niah_single_2", "niah_multikey_2", "niah_multivalue", "vt", "cwe")
OURS = (("dense", 1.0), ("sparq", 1 / 8), ("sparq-logits", 1 / 8), ("h2o", 1 / 8), ("streaming", 1 / 8))
PRESSES = ("SnapKVPress", "ExpectedAttentionPress", "StreamingLLMPress", "KnormPress", "TOVAPress")
RATIOS = (0.875, 0.75)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path!r}: no such file")
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:        # a line cut by a kill
                    pass
    return rows


def lm_eval_score(generated: str, answers) -> float:
    from lm_eval.tasks.ruler.common_utils import postprocess_pred, string_match_all
    return string_match_all(postprocess_pred([generated]), [list(answers)])


def same_answer(a: str, b: str) -> bool:
    from lm_eval.tasks.ruler.common_utils import postprocess_pred
    return postprocess_pred([a]) == postprocess_pred([b])


def ours_cells(rows, length: int, tasks) -> tuple[dict, dict]:
    """-> ({(label, task): {id: (score, generated)}}, {label or "prefill": CPU seconds}) of our harness."""
    cells, cpu = {}, {}
    for r in rows:
        if r["length"] != length or r["task"] not in tasks:
            continue
        if r["method"] == "prefill":
            cpu["prefill"] = cpu.get("prefill", 0.0) + r["cpu_s"]
            continue
        match = [m for m, c in OURS if m == r["method"] and abs(c - r["compression"]) < 1e-9]
        if not match:
            continue
        label = ("ours", r["method"], r["compression"])
        d = cells.setdefault((label, r["task"]), {})
        for i, s, g in zip(r["ids"], r["scores"], r["generated"]):
            d[i] = (s, g)
        cpu[label] = cpu.get(label, 0.0) + r["cpu_s"]
    return cells, cpu


def peer_cells(rows, length: int, tasks) -> tuple[dict, dict, float]:
    """-> (cells as ours_cells, CPU seconds per label, CPU seconds of the prefills the script ran: one
    per sample and invocation, shared by the methods of that invocation)."""
    cells, cpu, prefill = {}, {}, {}
    for r in rows:
        if r["length"] != length or r["task"] not in tasks:
            continue
        score = lm_eval_score(r["answer"], r["answers"])
        if score != r["score"]:
            raise SystemExit(f"error: {r['key']} {r['method']} {r['compression_ratio']}: lm-eval's string match "
                             f"gives {score}, the peer script recorded {r['score']}")
        label = ("kvpress", r["method"], r["compression_ratio"])
        cells.setdefault((label, r["task"]), {})[r["key"]] = (score, r["answer"])
        cpu[label] = cpu.get(label, 0.0) + r["cpu_s"]
        prefill[(r["key"], r.get("prefill_cpu_s"))] = r.get("prefill_cpu_s") or 0.0
    return cells, cpu, sum(prefill.values())


def token_check(peer_rows, samples_path: str, gguf_path: str) -> str:
    """Whether the peer fed kvpress our harness's very tokens: our GGUF tokenizer's ids of each sample
    (models/evaluation/ruler.py prefill: prefix + ids of the whole prompt) against the peer's ids_sha."""
    import hashlib
    from models import gguf
    from models.evaluation import prompts
    tok = gguf.tokenizer(gguf.open_gguf(gguf_path))
    samples = {s["id"]: s for s in read_jsonl(samples_path)}
    seen, same = {}, 0
    for r in peer_rows:
        if "ids_sha" not in r or r["key"] in seen:
            continue
        s = samples[r["key"]]
        full = prompts.prefix(tok) + prompts.encode(tok, s["context"] + s["question"] + s["answer_prefix"])
        k = len(prompts.encode(tok, s["question"] + s["answer_prefix"]))
        ok = (hashlib.sha256(json.dumps(full).encode()).hexdigest()[:16] == r["ids_sha"]
              and (len(full) - k, k) == (r["n_context_tokens"], r["n_question_tokens"]))
        seen[r["key"]] = ok
        same += ok
    bad = [k for k, ok in seen.items() if not ok]
    return (f"Tokens: kvpress got our harness's very token ids (and context/question split) on {same} of "
            f"{len(seen)} samples" + (f"; not on {', '.join(bad)}." if bad else "."))


def decode_checks(peer_rows) -> list[str]:
    """How the peer script's shortcuts compare with the pipeline on the samples where it recorded both:
    a batched decode against the same press decoded alone (unbatched_answer), the shared prefill
    against the pipeline's own call (pipeline_answer)."""
    lines = []
    for field, what in (("unbatched_answer", "decoded in a batch with the other presses of its ratio, against "
                         "decoded alone from the same cache"),
                        ("pipeline_answer", "from the shared prefill, against the pipeline's own call")):
        rows = [r for r in peer_rows if field in r]
        if not rows:
            continue
        same = [r for r in rows if r[field] == r["answer"]]
        diff = [f"{r['key']} {r['method']} {r['compression_ratio']:g}" for r in rows if r[field] != r["answer"]]
        lines.append(f"- {what}: the same answer in {len(same)} of {len(rows)} runs "
                     f"({len({r['key'] for r in rows})} samples)" + (f"; differs: {', '.join(diff)}." if diff else "."))
    return lines


def name(label) -> str:
    side, method, c = label
    if side == "ours":
        return "ours: dense" if method == "dense" else f"ours: {method} 1/{round(1 / c)}"
    return "kvpress: dense (no press)" if method == "dense" else f"kvpress: {method.replace('Press', '')} {c:g}"


def table(cells, cpu, labels, tasks) -> list[str]:
    import numpy as np
    lines = ["| method | " + " | ".join(tasks) + " | average | n | CPU h |", "|---" * (len(tasks) + 4) + "|"]
    n_max = {t: max((len(cells.get((l, t), {})) for l in labels), default=0) for t in tasks}
    for label in labels:
        got = [cells.get((label, t), {}) for t in tasks]
        if not any(got):
            continue
        means = [100 * np.mean([s for s, _ in g.values()]) if g else None for g in got]
        full = all(g and len(g) == n_max[t] for g, t in zip(got, tasks))
        avg = np.mean([m for m in means if m is not None])
        lines.append(f"| {name(label)} | " + " | ".join("-" if m is None else f"{m:.0f}" for m in means)
                     + (f" | {avg:.1f}" if full else f" | ({avg:.1f})")
                     + f" | {'/'.join(str(len(g)) for g in got)} | {cpu.get(label, 0) / 3600:.2f} |")
    return lines


def agreement(cells, tasks) -> list[str]:
    """Our dense vs kvpress's dense on the samples both have: the same generation (after RULER's
    postprocess_pred), the same score, and each task's summed score within one sample."""
    ours, peer = ("ours", "dense", 1.0), ("kvpress", "dense", 0.0)
    lines, rows, n_same, n_score, n_all = [], [], 0, 0, 0
    for t in tasks:
        a, b = cells.get((ours, t), {}), cells.get((peer, t), {})
        common = [i for i in a if i in b]
        if not common:
            continue
        same = [i for i in common if same_answer(a[i][1], b[i][1])]
        score = [i for i in common if a[i][0] == b[i][0]]
        n_same, n_score, n_all = n_same + len(same), n_score + len(score), n_all + len(common)
        sa, sb = sum(a[i][0] for i in common), sum(b[i][0] for i in common)
        rows.append(f"| {t} | {len(common)} | {len(same)} | {len(score)} | {sa:.2f} | {sb:.2f} | {sb - sa:+.2f} "
                    f"| {'yes' if abs(sb - sa) <= 1 else 'no'} |")
        for i in common:
            if i not in same:
                lines.append(f"- `{i}`: ours {a[i][0]:.2f} {a[i][1][:100]!r}; kvpress {b[i][0]:.2f} {b[i][1][:100]!r}")
    if not n_all:
        return ["No sample has both dense runs yet."]
    head = [f"Dense agreement on the {n_all} samples both sides have run: the same generation (after RULER's "
            f"postprocess_pred) on {n_same} ({100 * n_same / n_all:.0f}%; goal >= 90%), the same score on {n_score} "
            f"({100 * n_score / n_all:.0f}%).", "",
            "| task | n | same generation | same score | ours (sum) | kvpress (sum) | difference | within one sample |",
            "|---|---|---|---|---|---|---|---|", *rows, ""]
    return head + (["Samples whose two dense generations differ (first 100 characters):", "", *lines]
                   if lines else ["No sample differs."])


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ours", required=True, help="scripts/ruler_grid.py's JSONL")
    ap.add_argument("--peer", required=True, help="scripts/peers/kvpress_ruler.py's results.jsonl")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--markdown", help="also write the text here")
    ap.add_argument("--check-tokens", metavar="SAMPLES", help="the samples JSONL: check the peer's token ids "
                    "against our GGUF tokenizer's (needs --gguf)")
    ap.add_argument("--gguf", help="the model's GGUF file (for --check-tokens)")
    args = ap.parse_args(argv)

    if os.path.isfile(args.ours):
        ours, ours_cpu = ours_cells(read_jsonl(args.ours), args.length, args.tasks)
    else:
        print(f"warning: --ours {args.ours!r}: no such file yet, kvpress rows only", file=sys.stderr)
        ours, ours_cpu = {}, {}
    if args.check_tokens and not args.gguf:
        ap.error("--check-tokens needs --gguf")
    peer_rows = read_jsonl(args.peer)
    peer, peer_cpu, peer_prefill = peer_cells(peer_rows, args.length, args.tasks)
    cells, cpu = {**ours, **peer}, {**ours_cpu, **peer_cpu}
    labels = ([("ours", m, c) for m, c in OURS] + [("kvpress", "dense", 0.0)]
              + [("kvpress", p, r) for r in RATIOS for p in PRESSES])
    k = args.length // 1024
    lines = [f"RULER at {k}k, score in % (RULER's string match); n: samples per task in the order of the columns.",
             "", *table(cells, cpu, labels, args.tasks), "",
             f"CPU h: ours, the decode steps of that method (the dense prefill shared by all our methods took "
             f"{ours_cpu.get('prefill', 0) / 3600:.2f} CPU h more); kvpress, each run's own prefill, compression "
             f"and decode (its script shares one prefill among all presses of a sample: "
             f"{peer_prefill / 3600:.2f} CPU h of prefills in all; a decode batched over the presses of one "
             f"ratio is split evenly among them). "
             f"An average in brackets is over fewer samples than the column's largest n.", "",
             *agreement(cells, args.tasks)]
    checks = decode_checks([r for r in peer_rows if r["length"] == args.length and r["task"] in args.tasks])
    if checks:
        lines += ["", "The peer script's shortcuts against kvpress's own path:", "", *checks]
    if args.check_tokens:
        lines += ["", token_check([r for r in peer_rows if r["length"] == args.length and r["task"] in args.tasks],
                                  args.check_tokens, args.gguf)]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main() and 0)
