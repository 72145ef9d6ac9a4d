#!/usr/bin/env python
"""A diagnostic: RULER samples with the whole prompt (question included) prefilled dense, then each method
decodes the answer, against the grid's protocol (scripts/ruler_grid.py), where the question and answer
prefix go through decode steps with the method. If a method fails both ways, the question's decode
steps are not the cause.

    python scripts/ruler_question_dense.py --task niah_multikey_3 --length 4096 --indices 1,3,4 \
           --out docs/ruler_multikey3_question_dense.jsonl
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--task", default="niah_multikey_3")
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--indices", default="0", help="comma list of sample indices (the grid's ids ...-<index>)")
    p.add_argument("--methods", default="dense,sparq")
    p.add_argument("--compression", type=float, default=1 / 8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", required=True, help="JSON lines, one per sample")
    args = p.parse_args(argv)
    try:
        idx = [int(i) for i in args.indices.split(",")]
    except ValueError:
        p.error(f"--indices {args.indices!r}: expected a comma list of integers")
    if min(idx) < 0:
        p.error(f"--indices {args.indices!r}: expected indices >= 0")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens {args.max_new_tokens}: expected >= 1")
    from models.evaluation import ruler as _ruler
    if args.task not in _ruler.TASKS:
        p.error(f"--task {args.task!r}: not a RULER task here (one of {', '.join(_ruler.TASKS)})")

    import models
    import sparq_jax as sq
    from models.evaluation import prompts, ruler

    lm = models.from_pretrained(args.model)
    tok, cfg = lm.tokenizer, lm.config
    samples = ruler.build_samples(tok, args.task, max(idx) + 1, args.length, args.seed)
    grouped = cfg.num_key_value_heads < cfg.num_attention_heads
    with open(args.out, "w") as f:
        for i in idx:
            s = samples[i]
            ids = prompts.prefix(tok) + prompts.encode(tok, s.prompt)
            logits, state = lm.prefill(np.asarray([ids], np.int32), max_len=len(ids) + args.max_new_tokens,
                                       transposed_keys=True, h2o=True)
            row = {"id": s.id, "answers": list(s.answers), "prompt_tokens": len(ids),
                   "max_new_tokens": args.max_new_tokens, "compression": args.compression}
            for name in args.methods.split(","):
                m = sq.method_from_name(name, args.compression, cfg.head_dim, len(ids), grouped=grouped)
                new = np.asarray(lm.decode(logits, state, args.max_new_tokens, method=m))[0]
                row[name] = prompts.decode(tok, [int(t) for t in new])
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
