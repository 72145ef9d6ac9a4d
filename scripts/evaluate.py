#!/usr/bin/env python
"""Offline evaluation: passkey and multi-key retrieval, repetition and held-out bits per character, for
dense attention and every sparse method at several transfer ratios (the paper's Figure 1, in miniature).

    python scripts/evaluate.py --model smollm2-135m-instruct --context-length 4096 --limit 20 \
           --json docs/results_smollm2.json --plot docs/results_smollm2.png     # resumable
    python scripts/evaluate.py --tasks passkey --methods dense,sparq --compression 1/8 --limit 8
    python scripts/evaluate.py                                   # everything, the bundled model
    python scripts/evaluate.py lm-eval --model smollm2-135m-instruct --method sparq --compression 1/8 \
           --tasks sparq_passkey,sparq_plays_next_line --limit 20 --output results.json   # lm-eval tasks

The harness is the library's (models.evaluation.evaluate; its docstring gives the protocol): every
scored prediction comes out of a decode step run with the method under test, from one dense prefill
per batch of prompts shared by every method. Lengths are in tokens of the model's tokenizer. The
held-out texts are the public-domain plays in models/bundled/heldout.
Methods: dense; sparq (the paper's setting for GQA models: no mean reallocation); sparq-mean (with
it); sparq-logits (no reallocation, KV groups ranked by summed approximate logits as the authors'
code does); h2o; streaming (LM-Infinite: 16 sink positions + a recent window); flexgen (only at
ratios >= its floor of ~1/2). Each row's transfer_ratio is measured over the decode steps run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import models
from models import evaluation
from models.evaluation import ruler
from models.cli import positive_int, ratio_list
from sparq_jax import METHOD_NAMES


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
    p.add_argument("--tasks", type=_list(evaluation.TASKS + (ruler.GROUP,) + ruler.TASKS, "tasks"),
                   default=list(evaluation.TASKS[:4]),
                   help=f"comma list of {evaluation.TASKS}, ruler (its eleven tasks) or RULER's {ruler.TASKS} "
                        f"(default: the first four; needle and RULER fetch the Paul Graham essays once, code "
                        f"copies Python's own standard-library sources)")
    p.add_argument("--methods", type=_list(METHOD_NAMES, "methods"), default=list(METHOD_NAMES),
                   help=f"comma list of {METHOD_NAMES}")
    p.add_argument("--compression", type=ratio_list, default=list(evaluation.COMPRESSION),
                   help="target transfer ratios, comma list (0.125 or 1/8); default 1/2,1/4,1/8,1/16")
    p.add_argument("--limit", type=positive_int, help=f"samples per task (default {evaluation.DEFAULT_N})")
    p.add_argument("--context-length", type=positive_int,
                   help="prompt tokens per sample (default: the model's max_position_embeddings)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task builders")
    p.add_argument("--batch", type=positive_int, default=16, help="rows per prefill / decode batch (default 16)")
    p.add_argument("--bpc-tokens", type=positive_int, default=evaluation.BPC_SCORED,
                   help=f"bpc: tokens of each window scored through decode steps (default {evaluation.BPC_SCORED}, "
                        f"at most half the window)")
    p.add_argument("--heldout", default=evaluation.HELDOUT, help="folder of *.txt held-out texts for repetition "
                                                                 "and bpc (default: the plays in models/bundled/heldout)")
    p.add_argument("--json", help="write the results here as JSON; if it exists with the same model, "
                                  "context length and seed, its cells are kept and not run again")
    p.add_argument("--plot", help="write a PNG of score vs measured transfer ratio here")
    return p, p.parse_args(argv)


def lm_eval_main(argv):
    """`evaluate.py lm-eval ...`: lm-evaluation-harness tasks through the sparq-jax backend
    (models.evaluation.lm_eval; needs pip install -e ".[eval]")."""
    p = argparse.ArgumentParser(prog="evaluate.py lm-eval", description=lm_eval_main.__doc__)
    p.add_argument("--model", default="bundled", help="a checkpoint folder, a .gguf file or a known name")
    p.add_argument("--method", choices=METHOD_NAMES, default="dense")
    p.add_argument("--compression", help="the method's transfer ratio (0.125 or 1/8); not for dense")
    p.add_argument("--tasks", required=True, help="comma list of lm-eval task names (shipped: sparq_passkey, "
                                                  "sparq_plays_next_line, sparq_ruler)")
    p.add_argument("--include-path", help="a folder of more lm-eval task YAML")
    p.add_argument("--limit", type=positive_int, help="documents per task")
    p.add_argument("--batch-size", type=positive_int, default=1, help="rows per prefill (default 1)")
    p.add_argument("--dtype", default="float32", help="the weights' dtype (float32, bfloat16, float16)")
    p.add_argument("--output", help="write lm-eval's results here as JSON")
    p.add_argument("--metadata", type=json.loads, default=None,
                   help='the tasks\' metadata as JSON, e.g. \'{"max_seq_lengths": [4096]}\' for sparq_ruler')
    args = p.parse_args(argv)
    if args.metadata is not None and not isinstance(args.metadata, dict):
        p.error(f"--metadata must be a JSON object, got {args.metadata!r}")
    from models.evaluation import lm_eval as backend
    try:
        return backend.run(args.model, args.method, args.compression, args.tasks.split(","), args.include_path,
                           args.limit, args.batch_size, args.dtype, args.output, metadata=args.metadata)
    except ValueError as err:
        p.error(str(err))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:
        return lm_eval_main(argv[1:])
    parser, args = parse_args(argv)
    if args.context_length is not None and args.context_length < 64:
        parser.error(f"--context-length must be >= 64, got {args.context_length}")
    heldout = None
    if set(args.tasks) & {"repetition", "bpc"}:
        try:
            heldout = evaluation.heldout_text(args.heldout)
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
    try:
        store = evaluation.ResultsFile(args.json, {"model": args.model, "context_length": ctx, "seed": args.seed})
    except ValueError as err:
        raise SystemExit(f"error: --json {err}")
    if store.rows:
        print(f"resuming {args.json}: {len(store.rows)} cells kept", file=sys.stderr)
    start = time.time()
    evaluation.evaluate(lm, args.tasks, args.methods, args.compression, args.limit, ctx, args.seed, heldout,
                        batch=args.batch, done=store.done, on_result=store.add, bpc_tokens=args.bpc_tokens)
    wanted = {(t, m, r) for t in ruler.expand(args.tasks)
              for m, r in evaluation.configurations(args.methods, args.compression)}
    results = [r for r in store.rows if (r["task"], r["method"], r["compression"]) in wanted]
    print(evaluation.format_table(results))
    print(f"({time.time() - start:.0f} s, context {ctx} tokens, seed {args.seed})")
    store.write()
    if args.plot:
        name = os.path.basename(os.path.normpath(args.model))
        evaluation.plot(results, args.plot, f"{name}: context {ctx} tokens, seed {args.seed}")
    return results


if __name__ == "__main__":
    main()
