#!/usr/bin/env python
"""Method or implementation? One decode step of a real prompt, every layer's q and cache captured, and
SparQ's selected positions (sparq_jax.stages.select, what attend uses) compared with a float64 NumPy
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--task", default="code")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="sparq,sparq-logits")
    p.add_argument("--compression", type=float, default=1 / 8)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import models
    import sparq_jax as sq
    from models.evaluation import prompts
    from sparq_jax import stages

    lm = models.from_pretrained(args.model)
    tok = lm.tokenizer
    (sample,) = prompts.build_samples(tok, args.task, 1, args.length, args.seed)
    prompt = getattr(sample, "prompt", None) or sample.context + sample.question
    ids = prompts.prefix(tok) + prompts.encode(tok, prompt)
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
    lm.model(token[:, None], state[0].lengths[:, None], attention)
    report = {"model": args.model, "task": args.task, "length": args.length, "seed": args.seed,
              "prompt_tokens": len(ids), "compression": args.compression, "methods": {}}
    for name in args.methods.split(","):
        method = sq.method_from_name(name, args.compression, d, len(ids), grouped=grouped)
        layers = []
        for layer in sorted(captured):
            q, cache = captured[layer]
            st = stages.select(jnp.asarray(q), cache, method)
            i2, valid = np.asarray(st.i2), np.asarray(st.valid)
            length = int(np.asarray(cache.lengths)[0])
            k_all = np.asarray(cache.k, np.float32)
            for h in range(cfg.num_key_value_heads):
                ours = set(i2[0, h][valid[0, h]].tolist())
                qg = q[0, h * G:(h + 1) * G]
                ref = algorithm1_selection(qg, k_all[0, h], length, method.rank, method.top_k, method.local_window,
                                           method.group_scores)
                mass = exact_mass(qg, k_all[0, h], length)
                best = set(np.argsort(-mass, kind="stable")[:len(ref)].tolist())
                layers.append({"layer": layer, "kv_head": h, "k": len(ref), "overlap": len(ours & ref) / len(ref),
                               "mass_ours": float(mass[list(ours)].sum() / G),
                               "mass_algorithm1": float(mass[list(ref)].sum() / G),
                               "mass_best_k": float(mass[list(best)].sum() / G)})
        summary = {key: float(np.mean([x[key] for x in layers]))
                   for key in ("overlap", "mass_ours", "mass_algorithm1", "mass_best_k")}
        summary["min_overlap"] = float(min(x["overlap"] for x in layers))
        summary.update(rank=method.rank, top_k=method.top_k, local_window=method.local_window)
        report["methods"][name] = {"summary": summary, "heads": layers}
        print(name, json.dumps(summary), file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    jax.clear_caches()


if __name__ == "__main__":
    main()
