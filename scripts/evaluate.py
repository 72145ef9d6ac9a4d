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
import signal
import sys
import time
import types

import models
from models import evaluation, hf
from models.evaluation import ruler
from models.cli import image_file, method_list, names_list, output_file, positive_int, ratio_list, unique
from sparq_jax import METHOD_NAMES


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled", help="a checkpoint folder, a .gguf file, a known name "
                                                       "(smollm2-135m-instruct) or bundled (default: bundled)")
    p.add_argument("--tasks", type=names_list(evaluation.TASKS + (ruler.GROUP,) + ruler.TASKS, "task"), action="extend",
                   help=f"comma list of {evaluation.TASKS}, ruler (its eleven tasks) or RULER's {ruler.TASKS} "
                        f"(default: the first four; needle and RULER fetch the Paul Graham essays once, code "
                        f"copies Python's own standard-library sources)")
    p.add_argument("--methods", "--method", type=method_list, action="extend",
                   help=f"comma list of {', '.join(METHOD_NAMES)} (default: all)")
    p.add_argument("--compression", type=ratio_list, default=list(evaluation.COMPRESSION),
                   help="target transfer ratios, comma list (0.125 or 1/8); default 1/2,1/4,1/8,1/16")
    p.add_argument("--limit", type=positive_int, help=f"samples per task (default {evaluation.DEFAULT_N})")
    p.add_argument("--context-length", type=positive_int,
                   help=f"prompt tokens per sample, at least {evaluation.harness.MIN_CONTEXT} (default: the model's "
                        f"max_position_embeddings less {evaluation.harness.ANSWER_ROOM} for the answers)")
    p.add_argument("--beyond-positions", action="store_true",
                   help="allow prompts and answers past the model's max_position_embeddings (refused otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task builders")
    p.add_argument("--batch", type=positive_int, default=16, help="rows per prefill / decode batch (default 16)")
    p.add_argument("--bpc-tokens", type=positive_int, default=evaluation.BPC_SCORED,
                   help=f"bpc: tokens of each window scored through decode steps (default {evaluation.BPC_SCORED}, "
                        f"at most half the window)")
    p.add_argument("--heldout", default=evaluation.HELDOUT, help="folder of *.txt held-out texts for repetition "
                                                                 "and bpc (default: the plays in models/bundled/heldout)")
    p.add_argument("--json", type=output_file, help="write the results here as JSON, each cell as soon as it is "
                                                    "finished; if it exists with the same model, context length and "
                                                    "seed, its cells are kept and not run again")
    p.add_argument("--plot", type=image_file, help="write a plot (.png, .pdf, .svg) of score vs measured transfer "
                                                   "ratio here")
    args = p.parse_args(argv)
    args.tasks, args.methods = unique(args.tasks, evaluation.TASKS[:4]), unique(args.methods, METHOD_NAMES)
    return p, args


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
    p.add_argument("--output", type=output_file, help="write lm-eval's results here as JSON")
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


def _interrupted(signum, frame):
    raise KeyboardInterrupt       # SIGTERM ends the run as Ctrl-C does: the finished cells are stored


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:
        return lm_eval_main(argv[1:])
    parser, args = parse_args(argv)
    heldout = None
    if set(args.tasks) & {"repetition", "bpc"}:
        try:
            heldout = evaluation.heldout_text(args.heldout)
        except ValueError as err:
            parser.error(f"--heldout: {err}")
    # Every check before any weight is read: the checkpoint's config and tokenizer are enough.
    try:
        checkpoint = hf.open_checkpoint(args.model)
    except (ValueError, OSError) as err:
        parser.error(f"--model {args.model!r}: {err}")
    model = types.SimpleNamespace(config=checkpoint.config, tokenizer=checkpoint.tokenizer())
    if model.tokenizer is None:
        parser.error(f"--model {args.model!r} has no tokenizer")
    try:
        grid = evaluation.prepare(model, args.tasks, args.methods, args.compression, args.limit, args.context_length,
                                  args.seed, heldout, args.batch, (), args.bpc_tokens, args.beyond_positions)
    except ValueError as err:
        parser.error(str(err))
    ctx = grid.context_length
    try:
        store = evaluation.ResultsFile(args.json, {"model": args.model, "context_length": ctx, "seed": args.seed})
    except ValueError as err:
        parser.error(f"--json: {err}")
    if store.rows or store.partial:
        print(f"resuming {args.json}: {len(store.rows)} cells kept"
              + (f", {len(store.partial)} cells part-done" if store.partial else ""), file=sys.stderr)
    lm = models.from_pretrained(args.model)
    start = time.time()
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        evaluation.evaluate(lm, args.tasks, args.methods, args.compression, args.limit, ctx, args.seed, heldout,
                            batch=args.batch, done=store.done, on_result=store.add, bpc_tokens=args.bpc_tokens,
                            beyond_positions=args.beyond_positions, partial=store.partial, on_progress=store.progress)
    except KeyboardInterrupt:
        kept = (f"; the {len(store.rows)} finished cells (and the finished batches of "
                f"{len(store.partial)} more) are in {args.json}: run the same command to resume") if args.json else ""
        print(f"interrupted{kept}", file=sys.stderr)
        return 130
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
    outcome = main()
    if outcome == 130:
        # Interrupted: the finished cells are stored. Leave at once: an interpreter shutdown with XLA's
        # threads still compiling or running can crash.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(0)
