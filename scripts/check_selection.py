#!/usr/bin/env python
"""Method or implementation? One decode step of a real prompt, every layer's q and cache captured, and
SparQ's selected positions (sparq_jax.stages.run's top-k part: the pipeline attend runs) compared with a float64 NumPy
transcription of Algorithm 1 written here (the paper's steps, one row and KV head at a time; GQA: the
group's query heads share one selection, ranked by summed s_hat, or by summed logits for sparq-logits).

For each layer and (row, KV head): the overlap of the two top-k sets, and the exact attention mass
(dense softmax of the step, summed over the group) that each set covers, next to the best possible
top-k set (the k positions of largest exact mass). Equal sets say the implementation does what the
algorithm says; the mass the algorithm's own set misses, against the best set, is the method's loss.

    python scripts/check_selection.py --model qwen2.5-coder-0.5b-instruct --task code --length 4096 \
           --out /work/runs/code_selection_check.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def algorithm1_selection(q, k, length, rank, top_k, local_window, group_scores="softmax"):
    """Algorithm 1's steps 1-2 in float64 for one row and KV head: q [G, D] (the group's query heads),
    k [S, D] (the cache, first `length` positions valid) -> the selected positions (a set)."""
    G, D = q.shape
    Q, K = q.astype(np.float64), k[:length].astype(np.float64)
    i1 = np.argsort(-np.abs(Q).sum(0), kind="stable")[:rank]          # step 1: the r largest |q| components
    per_head = []
    for g in range(G):
        tau = np.sqrt(D * np.abs(Q[g, i1]).sum() / np.abs(Q[g]).sum())
        z = K[:, i1] @ Q[g, i1] / tau
        per_head.append(softmax(z) if group_scores == "softmax" else z)
    score = np.sum(per_head, axis=0)
    score[length - min(length, max(local_window, 1)):] = np.inf       # the local window (and newest) kept
    return set(np.argsort(-score, kind="stable")[:min(top_k, length)].tolist())


def exact_mass(q, k, length):
    """The step's dense attention [S] summed over the group's heads (each head's softmax sums to 1)."""
    Q, K = q.astype(np.float64), k[:length].astype(np.float64)
    return np.sum([softmax(K @ Q[g] / np.sqrt(Q.shape[1])) for g in range(Q.shape[0])], axis=0)


def needle_positions(tok, prompt: str, answers, offset: int) -> dict:
    """{answer: the token positions (in prefix + prompt ids) of its last occurrence in the prompt}, found
    by encoding the prompt up to and through it (a BPE merge at either edge can shift it by a token)."""
    from models.evaluation import prompts
    out = {}
    for a in answers:
        i = prompt.rfind(a)
        if i < 0:
            continue
        lo, hi = len(prompts.encode(tok, prompt[:i])), len(prompts.encode(tok, prompt[:i + len(a)]))
        out[a] = set(range(offset + lo, offset + hi))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--task", default="code")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", type=int, default=0, help="which sample of the seed's list (RULER: the grid's "
                   "sample id ...-<index>)")
    p.add_argument("--n", type=int, default=None, help="samples to build (default index + 1; RULER's grid "
                   "builds 10 at 4k)")
    p.add_argument("--then", default="", metavar="TEXT",
                   help="text appended to the prompt (e.g. dense's answer up to where a method's answer leaves it): "
                        "the step checked is the one that predicts the token after it")
    p.add_argument("--methods", default="sparq,sparq-logits")
    p.add_argument("--compression", type=float, default=1 / 8)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.index < 0:
        p.error(f"--index {args.index}: expected >= 0")
    n = args.index + 1 if args.n is None else args.n
    if n <= args.index:
        p.error(f"--n {args.n}: must exceed --index {args.index}")

    import jax
    import jax.numpy as jnp

    import models
    import sparq_jax as sq
    from models.evaluation import prompts
    from sparq_jax import stages
    from sparq_jax.attention import candidate_mask
    from sparq_jax.sparq import selected_valid

    lm = models.from_pretrained(args.model)
    tok = lm.tokenizer
    sample = prompts.build_samples(tok, args.task, n, args.length, args.seed)[args.index]
    prompt = (getattr(sample, "prompt", None) or sample.context + sample.question) + args.then
    ids = prompts.prefix(tok) + prompts.encode(tok, prompt)
    needles = needle_positions(tok, prompt, getattr(sample, "answers", ()), len(prompts.prefix(tok)))
    t0 = time.time()
    _, state = lm.prefill(np.asarray([ids[:-1]], np.int32), max_len=len(ids) + 8, transposed_keys=True, h2o=True)
    print(f"prefill {len(ids) - 1} tokens: {time.time() - t0:.0f} s", file=sys.stderr)
    cfg = lm.config
    d, grouped = cfg.head_dim, cfg.num_key_value_heads < cfg.num_attention_heads
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    captured = {}

    def attention(layer, q, k, v):           # llama.decode_step's, keeping each layer's q and cache
        cache = state[layer].append(k.swapaxes(1, 2), v.swapaxes(1, 2))
        captured[layer] = (np.asarray(q[:, 0], np.float32), cache)
        out, cache = sq.attend(q[:, 0], cache, sq.Dense(), window=cfg.sliding_window)
        return out[:, None], cache

    token = jnp.asarray([ids[-1]], jnp.int32)
    hidden, _ = lm.model(token[:, None], state[0].lengths[:, None], attention)

    def next_tokens(h, n=3):   # the step's top n next tokens: (text, probability)
        logits = np.asarray(lm.model.head(h[:, -1]), np.float64)[0]
        p = softmax(logits)
        return [(prompts.decode(tok, [int(i)]), round(float(p[i]), 4)) for i in np.argsort(-p)[:n]]

    def step_with(method):     # the same step with `method` in every layer (the dense prefill's cache)
        def attention_m(layer, q, k, v):
            cache = state[layer].append(k.swapaxes(1, 2), v.swapaxes(1, 2))
            out, cache = sq.attend(q[:, 0], cache, method, window=cfg.sliding_window)
            return out[:, None], cache
        return lm.model(token[:, None], state[0].lengths[:, None], attention_m)[0]
    report = {"model": args.model, "task": args.task, "length": args.length, "seed": args.seed,
              "index": args.index, "then": args.then, "id": getattr(sample, "id", None), "prompt_tokens": len(ids),
              "compression": args.compression, "answers": list(getattr(sample, "answers", ())),
              "needle_positions": {a: sorted(v) for a, v in needles.items()},
              "next_tokens_dense": next_tokens(hidden), "methods": {}}
    print("dense next tokens", report["next_tokens_dense"], file=sys.stderr)
    for name in args.methods.split(","):
        method = sq.method_from_name(name, args.compression, d, len(ids), grouped=grouped)
        layers = []
        for layer in sorted(captured):
            q, cache = captured[layer]
            _, parts = stages.run(jnp.asarray(q), cache, method, window=cfg.sliding_window)
            i2 = parts["top-k"].out
            i2, valid = np.asarray(i2), np.asarray(selected_valid(candidate_mask(
                cache.lengths, cache.max_len, cfg.sliding_window), i2))
            length = int(np.asarray(cache.lengths)[0])
            k_all = np.asarray(cache.k, np.float32)
            for h in range(cfg.num_key_value_heads):
                ours = set(i2[0, h][valid[0, h]].tolist())
                qg = q[0, h * G:(h + 1) * G]
                ref = algorithm1_selection(qg, k_all[0, h], length, method.rank, method.top_k, method.local_window,
                                           method.group_scores)
                mass = exact_mass(qg, k_all[0, h], length)
                best = set(np.argsort(-mass, kind="stable")[:len(ref)].tolist())
                row = {"layer": layer, "kv_head": h, "k": len(ref), "overlap": len(ours & ref) / len(ref),
                       "mass_ours": float(mass[list(ours)].sum() / G),
                       "mass_algorithm1": float(mass[list(ref)].sum() / G),
                       "mass_best_k": float(mass[list(best)].sum() / G)}
                if needles:      # the answers' own tokens: exact mass on them, and how many each set holds
                    pos = sorted(set().union(*needles.values()))
                    row.update(needle_mass=float(mass[pos].sum() / G), needle_in_ours=len(ours.intersection(pos)) / len(pos),
                               needle_in_best_k=len(best.intersection(pos)) / len(pos),
                               needle_mass_in_ours=float(mass[sorted(ours.intersection(pos))].sum() / max(mass[pos].sum(), 1e-30)))
                layers.append(row)
        keys = ("overlap", "mass_ours", "mass_algorithm1", "mass_best_k") + (
            ("needle_mass", "needle_in_ours", "needle_in_best_k") if needles else ())
        summary = {key: float(np.mean([x[key] for x in layers])) for key in keys}
        if needles:      # the heads that look at the answer (>= 10% of their mass on its tokens)
            focus = [x for x in layers if x["needle_mass"] >= 0.1]
            summary.update(needle_heads=len(focus), needle_mass_in_ours_focus=float(np.mean(
                [x["needle_mass_in_ours"] for x in focus])) if focus else None,
                needle_focus_heads=[(x["layer"], x["kv_head"], round(x["needle_mass"], 3), round(x["needle_mass_in_ours"], 3))
                                    for x in focus])
        summary["min_overlap"] = float(min(x["overlap"] for x in layers))
        summary.update(rank=method.rank, top_k=method.top_k, local_window=method.local_window)
        summary["next_tokens"] = next_tokens(step_with(method))
        report["methods"][name] = {"summary": summary, "heads": layers}
        print(name, json.dumps(summary), file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    jax.clear_caches()


if __name__ == "__main__":
    main()
