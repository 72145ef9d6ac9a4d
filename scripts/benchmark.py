#!/usr/bin/env python
"""Benchmarks: one decode step of attention (Dense vs SparQ), and whole decode steps of a model.

    python scripts/benchmark.py attention --batch 4 --kv-heads 8 --seq-len 32768 --compression 1/8
    python scripts/benchmark.py attention --sweep 1024,4096,16384,65536 --plot sweep.png
    python scripts/benchmark.py decode --seq-lens 8192,32768 --batch 1,8
    python scripts/benchmark.py decode --preset smollm2-135m --seq-lens 8192 --dtype bfloat16
    python scripts/benchmark.py model --model smollm2-135m-instruct --contexts 2048,4096,8192 --batches 1,4
    python scripts/benchmark.py model --model qwen2.5-coder-0.5b-instruct --contexts 4096,8192,16384 --batches 1
    python scripts/benchmark.py model --model smollm2-135m-instruct --contexts 4096 --batches 1 --dtypes float32,bfloat16

Every timing is measured side by side in one process: the candidates run interleaved, repetition
after repetition, and each reports the median after warm-up. Speedups are ratios of those medians.
"""
from __future__ import annotations

import argparse
import json

from models.bench import attention, decode, hlo, model
from models.bench.timing import DTYPES
from models.cli import image_file, int_list, output_file, positive_int, ratio

# Defaults are the options dataclasses' (argparse leaves a flag not given out of the namespace).
COMMANDS = {"attention": (attention.AttentionOptions, attention.run_attention),
            "decode": (decode.DecodeOptions, decode.run_decode),
            "launches": (dict, lambda options: hlo.dump_launches(**options)),
            "model": (model.ModelOptions, model.run_model)}


def _attention_flags(a) -> None:
    for flag in ("batch", "q-heads", "kv-heads", "seq-len", "head-dim"):
        a.add_argument(f"--{flag}", type=positive_int)
    a.add_argument("--compression", type=ratio, help="target transfer ratio for SparQ.for_compression (0.125 or 1/8)")
    a.add_argument("--rank", type=positive_int, help="SparQ r (with --top-k, instead of --compression)")
    a.add_argument("--top-k", type=positive_int, help="SparQ k")
    a.add_argument("--local-window", type=int, help="SparQ l (with --rank and --top-k)")
    a.add_argument("--no-reallocate", dest="reallocate_mean", action="store_false",
                   help="SparQ without mean reallocation")
    a.add_argument("--dtype", choices=sorted(DTYPES))
    a.add_argument("--impl", choices=list(attention.IMPL_CHOICES))
    a.add_argument("--single-copy", action="store_true", help="also time SparQ with K stored once")
    a.add_argument("--interpret", action="store_true",
                   help="run the Pallas kernels in interpret mode (a CPU check of the GPU code path; slow)")
    a.add_argument("--reps", type=positive_int)
    a.add_argument("--warmup", type=positive_int)
    a.add_argument("--inner", type=positive_int,
                   help="calls per timed sample, dispatched back to back (default 1 on CPU, 20 elsewhere)")
    a.add_argument("--breakdown", action="store_true",
                   help="also time SparQ's stages one by one (step 1, softmax + top-k variants, steps 2+3)")
    a.add_argument("--seed", type=int)
    a.add_argument("--sweep", type=int_list, help="comma-separated sequence lengths (instead of --seq-len)")
    a.add_argument("--plot", type=image_file, help="a plot (.png, .pdf, .svg) of time and speedup vs S (with --sweep)")


def _decode_flags(d) -> None:
    d.add_argument("--preset", choices=sorted(decode.PRESETS), help="model shape; the flags below override its fields")
    d.add_argument("--seq-lens", type=int_list)
    d.add_argument("--batch", type=int_list, help="comma-separated batch sizes")
    d.add_argument("--steps", type=positive_int, help="decode steps per timed loop")
    d.add_argument("--dtype", choices=sorted(DTYPES), help="weights and cache")
    for flag in ("layers", "hidden", "q-heads", "kv-heads", "head-dim", "intermediate", "vocab"):
        d.add_argument(f"--{flag}", type=positive_int)
    d.add_argument("--tied", action=argparse.BooleanOptionalAction, help="tie the output head to the embedding")
    d.add_argument("--compression", type=ratio)
    d.add_argument("--reps", type=positive_int)
    d.add_argument("--warmup", type=positive_int)


def _model_flags(m) -> None:
    m.add_argument("--model", required=True, help="what models.from_pretrained takes: a folder, a .gguf, a name")
    m.add_argument("--contexts", type=int_list, help="prompt lengths")
    m.add_argument("--batches", type=int_list)
    m.add_argument("--new-tokens", type=positive_int, help="decode steps timed per run (+1 from prefill)")
    m.add_argument("--compression", type=ratio)
    m.add_argument("--dtype", choices=sorted(DTYPES))
    m.add_argument("--dtypes", type=lambda text: tuple(text.split(",")),
                   help="instead of --dtype: float32 and others side by side (float32,bfloat16): prefill, dense "
                        "decode, and each one's logit error against float32, ours and transformers'")
    m.add_argument("--reps", type=positive_int, help="timed repetitions after the compiling one")
    m.add_argument("--no-torch", dest="torch", action="store_false", help="skip transformers' model")
    m.add_argument("--one-call", action="store_true",
                   help="also time the prefill as one jitted call (the cost of lm.prefill's chunks)")
    m.add_argument("--seed", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    quiet = {"argument_default": argparse.SUPPRESS}
    _attention_flags(sub.add_parser("attention", help="one decode step of attention: Dense vs SparQ", **quiet))
    _decode_flags(sub.add_parser("decode", help="whole decode loops (lm.decode) of a random-weight model: Dense vs SparQ",
                                 **quiet))
    n = sub.add_parser("launches", help="kernel launches per step in the decode loops of an XLA dump", **quiet)
    n.add_argument("dump", help="the --xla_dump_to folder (with --xla_dump_hlo_as_text)")
    n.add_argument("--layers", type=positive_int, required=True, help="the model's layers (for launches per layer)")
    n.add_argument("--module", help="modules whose name contains this")
    _model_flags(sub.add_parser("model", help="prefill and decode throughput of a real checkpoint, with transformers "
                                              "as peer", **quiet))
    for p in sub.choices.values():
        p.add_argument("--json", type=output_file,
                       help="write the results as JSON" if p is not n else "write the counts as JSON")
    return parser


# Flags that do nothing next to others (argparse leaves a flag not given out of the namespace): refused.
CONFLICTS = {"attention": [("compression", ("rank", "top_k")), ("seq_len", ("sweep",))],
             "decode": [], "launches": [], "model": [("dtypes", ("dtype", "compression", "one_call"))]}
NEEDS = {"attention": [("local_window", ("rank", "top_k"))], "decode": [], "launches": [], "model": []}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_flags(parser, command: str, values: dict) -> None:
    """parser.error naming the flag when a flag given would be ignored."""
    for flag, others in CONFLICTS[command]:
        clash = [o for o in others if o in values]
        if flag in values and clash:
            parser.error(f"{_flag(flag)} does not apply with {' and '.join(map(_flag, clash))}: give one or the other")
    for flag, needed in NEEDS[command]:
        if flag in values and not all(o in values for o in needed):
            parser.error(f"{_flag(flag)} applies only with {' and '.join(map(_flag, needed))}")


def main(argv=None) -> None:
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    command, path = values.pop("command"), values.pop("json", None)
    check_flags(parser, command, values)
    options_type, run = COMMANDS[command]
    try:
        options = options_type(**values)
        if command == "attention":          # every budget before any work
            for seq_len in options.sweep or (options.seq_len,):
                options.method(seq_len)
    except ValueError as err:
        parser.error(str(err))
    try:
        document = run(options)
    except FileNotFoundError as err:        # a dump folder or checkpoint that is not there
        raise SystemExit(str(err))
    if path:
        with open(path, "w") as f:
            json.dump(document, f, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
