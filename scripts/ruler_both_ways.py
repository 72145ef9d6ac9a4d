#!/usr/bin/env python
"""Dense generations of the same RULER samples through lm-eval (the sparq_ruler tasks, the sparq-jax
backend) and through the harness (models.evaluation.ruler's runner pair), side by side.

    python scripts/ruler_both_ways.py --length 1024 --limit 2 --out /work/runs/ruler_dense_both_ways.json
"""
from __future__ import annotations

import argparse
import functools
import json

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--tasks", default="niah_single_2,niah_multikey_2,vt,fwe")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--limit", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import models
    import sparq_jax as sq
    from models.evaluation import lm_eval as backend, ruler

    tasks = args.tasks.split(",")
    results = backend.run(args.model, "dense", None, [f"sparq_ruler_{t}" for t in tasks], limit=args.limit,
                          metadata={"max_seq_lengths": [args.length]}, log_samples=True, print_table=True)
    lm = models.from_pretrained(args.model)
    rows = []
    for task in tasks:
        logged = sorted(results["samples"][f"sparq_ruler_{task}"], key=lambda x: x["doc_id"])
        samples = ruler.build_samples(lm.tokenizer, task, args.limit, args.length)
        prefilled = ruler.prefill(lm, samples)
        method_of = functools.partial(sq.method_from_name, "dense", 1.0, lm.config.head_dim)
        texts, _ = ruler.generate(lm, samples, method_of, prefilled)
        for s, x, ours in zip(samples, logged, texts):
            theirs = x["resps"][0][0]
            rows.append({"id": s.id, "same_prompt": x["arguments"][0][0] == s.prompt,
                         "same_generation": theirs == ours, "lm_eval": theirs, "harness": ours,
                         "answers": list(s.answers), "score_lm_eval": ruler.score(theirs, s.answers),
                         "score_harness": ruler.score(ours, s.answers)})
            print(json.dumps({k: rows[-1][k] for k in ("id", "same_prompt", "same_generation", "score_lm_eval",
                                                       "score_harness")}), flush=True)
    summary = {"same_prompts": sum(r["same_prompt"] for r in rows), "same_generations": sum(r["same_generation"]
               for r in rows), "n": len(rows), "length": args.length, "model": args.model}
    print(json.dumps(summary))
    with open(args.out, "w") as f:
        json.dump({**summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
