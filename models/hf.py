"""Hugging Face checkpoints: from_pretrained (safetensors -> llama.Llama) and save_pretrained; GGUF
files (models/gguf.py) and known names (models/known.py) are found here and feed the same loader.

Of Hugging Face's formats only safetensors are read: unpickling a pytorch_model.bin runs arbitrary code. The safetensors
header is parsed here (8-byte length, JSON, raw little-endian data), so bf16 tensors read straight
into numpy (ml_dtypes' bfloat16, as jax uses) one at a time, and every problem with a checkpoint is
found from its config and headers before any weight is read or any model exists.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from flax import nnx
from tqdm.auto import tqdm

from sparq_jax import sharding

from . import gguf, known, llama
from .config import CheckpointError, ModelConfig
from .lm import LanguageModel

SAFETENSORS_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                      "BF16": np.dtype(jnp.bfloat16)}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
LOAD_DTYPES = ("float32", "bfloat16", "float16")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers some checkpoints carry that the model recomputes.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# What a Hub download asks for: the safetensors weights, the configs and the tokenizer files, never a
# pickled *.bin / *.pt checkpoint (this loader refuses those anyway).
HUB_FILES = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
             "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
             "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# The small trained model that ships with the package (models.BUNDLED; the name "bundled").
BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled")


# ---------------------------------------------------------------------------------------------
# Tensor names: Hugging Face's LlamaForCausalLM / MistralForCausalLM <-> llama.Llama's params

@dataclasses.dataclass(frozen=True)
class _Slot:
    field: str                 # a key of llama.weight_shapes
    layer: Optional[int]       # the layer, None for embed / norm / lm_head (llama.param_path)
    hf_shape: tuple[int, ...]
    transposed: bool           # torch Linear weights are [out, in]; ours are input-major


def _layout(config: ModelConfig) -> dict[str, _Slot]:
    """Every tensor name the checkpoint must hold -> where it goes."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = {
        "input_layernorm.weight": ("input_norm", (h,), False),
        "self_attn.q_proj.weight": ("q", (q, h), True),
        "self_attn.k_proj.weight": ("k", (kv, h), True),
        "self_attn.v_proj.weight": ("v", (kv, h), True),
        "self_attn.o_proj.weight": ("o", (h, q), True),
        "post_attention_layernorm.weight": ("post_norm", (h,), False),
        "mlp.gate_proj.weight": ("gate", (i, h), True),
        "mlp.up_proj.weight": ("up", (i, h), True),
        "mlp.down_proj.weight": ("down", (h, i), True),
    }
    if config.attention_bias:
        per_layer.update({"self_attn.q_proj.bias": ("q_bias", (q,), False),
                          "self_attn.k_proj.bias": ("k_bias", (kv,), False),
                          "self_attn.v_proj.bias": ("v_bias", (kv,), False),
                          "self_attn.o_proj.bias": ("o_bias", (h,), False)})
    if config.mlp_bias:
        per_layer.update({"mlp.gate_proj.bias": ("gate_bias", (i,), False),
                          "mlp.up_proj.bias": ("up_bias", (i,), False),
                          "mlp.down_proj.bias": ("down_bias", (h,), False)})
    out = {"model.embed_tokens.weight": _Slot("embed", None, (v, h), False),
           "model.norm.weight": _Slot("norm", None, (h,), False)}
    for n in range(config.num_hidden_layers):
        for suffix, (field, shape, transposed) in per_layer.items():
            out[f"model.layers.{n}.{suffix}"] = _Slot("layers." + field, n, shape, transposed)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = _Slot("lm_head", None, (v, h), True)
    return out


def _to_hf(x: np.ndarray, slot: _Slot) -> np.ndarray:
    if slot.transposed:
        return np.ascontiguousarray(x.reshape(slot.hf_shape[::-1]).T)
    return x.reshape(slot.hf_shape)


# ---------------------------------------------------------------------------------------------
# safetensors files

@dataclasses.dataclass(frozen=True)
class _Entry:
    """One tensor of a checkpoint file, read on demand. Other formats (models/gguf.py) provide
    entries with the same three members: dtype (safetensors' name of what read() returns), shape
    (Hugging Face's layout) and read()."""

    path: str
    dtype: str                 # safetensors' name: F32, BF16, ...
    shape: tuple[int, ...]
    offset: int                # absolute byte offset in the file
    nbytes: int

    def read(self) -> np.ndarray:
        dtype = SAFETENSORS_DTYPES[self.dtype].newbyteorder("<")
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            x = np.fromfile(f, dtype=dtype, count=self.nbytes // dtype.itemsize)
        return x.reshape(self.shape)


def read_safetensors_header(path: str) -> dict[str, _Entry]:
    """name -> _Entry for every tensor of a .safetensors file; CheckpointError if it is malformed."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path} is not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        if not 0 <= begin <= end <= size - 8 - n:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file (bytes {begin}..{end})")
        if dtype in SAFETENSORS_DTYPES and end - begin != int(np.prod(shape)) * SAFETENSORS_DTYPES[dtype].itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} ({dtype} {list(shape)}) has {end - begin} bytes")
        entries[name] = _Entry(path, dtype, shape, 8 + n + begin, end - begin)
    return entries


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: Optional[dict] = None) -> None:
    """Write numpy arrays (float64/32/16 or bfloat16) as one .safetensors file."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    arrays = {}
    for name, x in tensors.items():
        x = np.ascontiguousarray(x)
        if x.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {x.dtype} cannot be written (float types only)")
        arrays[name] = x
        header[name] = {"dtype": _DTYPE_NAMES[x.dtype], "shape": list(x.shape),
                        "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)   # keeps the data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for x in arrays.values():
            f.write(x.astype(x.dtype.newbyteorder("<"), copy=False).tobytes())


# ---------------------------------------------------------------------------------------------
# Finding and checking a checkpoint

def _resolve(path_or_repo_id) -> tuple[str, str]:
    """("folder" or "gguf", local path). In order: a local path (a folder, a .gguf file, a folder with
    one .gguf and no config.json), "bundled", a known name (models/known.py, fetched on first use),
    a Hugging Face repo id (fetched through huggingface_hub)."""
    if not isinstance(path_or_repo_id, (str, os.PathLike)) or not os.fspath(path_or_repo_id):
        raise CheckpointError(f"path_or_repo_id must be a checkpoint folder, a .gguf file, a known name (bundled, "
                              f"{', '.join(known.KNOWN_MODELS)}) or a Hugging Face repo id, got {path_or_repo_id!r}")
    path = os.path.expanduser(os.fspath(path_or_repo_id))
    if os.path.exists(path):
        found = gguf.find(path)
        if found is not None:
            return "gguf", found
        if os.path.isdir(path):
            return "folder", path
        raise CheckpointError(f"{path} is a file; from_pretrained takes a checkpoint folder (config.json, "
                              f"model.safetensors, ...), a .gguf file, a known name "
                              f"({', '.join(known.KNOWN_MODELS)}) or a Hugging Face repo id")
    if path == "bundled":
        return "folder", BUNDLED
    if path in known.KNOWN_MODELS:
        return "gguf", known.fetch(path)
    if path.startswith((".", "/", "~")) or not _REPO_ID.match(path) or ".." in path or "--" in path:
        raise CheckpointError(f"no such checkpoint folder or file: {path} (known names: bundled, "
                              f"{', '.join(known.KNOWN_MODELS)})")
    try:
        from huggingface_hub import snapshot_download
        return "folder", snapshot_download(path, allow_patterns=list(HUB_FILES))
    except Exception as err:  # offline, unknown repo, gated: all end the same way for the user
        raise CheckpointError(
            f"{path!r} is not a local folder, a .gguf file or a known name (bundled, "
            f"{', '.join(known.KNOWN_MODELS)}), and could not be fetched from the Hugging Face Hub "
            f"({type(err).__name__}: {err}). Offline, point from_pretrained at a local folder instead: "
            f"download it where the Hub is reachable (`hf download {path} --local-dir DIR`), copy DIR "
            f"here, then models.from_pretrained('DIR')") from None


def resolve_path(path_or_repo_id) -> str:
    """The local path (a folder or a .gguf file) behind what from_pretrained takes, fetched if need be."""
    return _resolve(path_or_repo_id)[1]


def _weight_entries(folder: str) -> dict[str, _Entry]:
    """Every tensor of the folder's safetensors weights (single file or sharded index)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is malformed (needs a 'weight_map' object): {err!r}") from None
        entries = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                names = [n for n, s in weight_map.items() if s == shard]
                raise CheckpointError(f"{index} names shard {shard!r} (for {len(names)} tensors, e.g. "
                                      f"{names[0]!r}), but {shard_path} does not exist")
            header = read_safetensors_header(shard_path)
            for name, s in weight_map.items():
                if s == shard and name not in header:
                    raise CheckpointError(f"{index} puts tensor {name!r} in {shard!r}, which does not hold it")
            entries.update(header)
        return entries
    if os.path.exists(single):
        return read_safetensors_header(single)
    files = sorted(os.listdir(folder))
    pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES) or f == "pytorch_model.bin.index.json"]
    if pickles:
        raise CheckpointError(
            f"{folder} has only pickled PyTorch weights ({', '.join(pickles)}); this package loads "
            f"safetensors only, because unpickling a file runs whatever code it contains. If you trust "
            f"the source, convert it once with transformers in a separate environment: "
            f"AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT) writes model.safetensors; "
            f"or download the repo's safetensors revision if it has one")
    raise CheckpointError(f"{folder} has no weights: expected model.safetensors or "
                          f"model.safetensors.index.json (found: {', '.join(files) or 'nothing'})")


def _check_entries(config: ModelConfig, entries: dict[str, _Entry]) -> dict[str, _Slot]:
    layout = _layout(config)
    missing = [n for n in layout if n not in entries]
    unexpected = [n for n in entries if n not in layout and not _IGNORED.fullmatch(n)
                  and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    misshaped = [f"{n} is {list(entries[n].shape)}, expected {list(s.hf_shape)}"
                 for n, s in layout.items() if n in entries and entries[n].shape != s.hf_shape]
    if misshaped:
        problems.append(f"misshaped tensors: {_names(misshaped)}")
    not_float = [f"{n} ({entries[n].dtype})" for n in layout if n in entries
                 and entries[n].dtype not in SAFETENSORS_DTYPES]
    if not_float:
        problems.append(f"tensors whose dtype is not a float type ({'/'.join(SAFETENSORS_DTYPES)}): "
                        f"{_names(not_float)}")
    if problems:
        raise CheckpointError(f"the checkpoint does not match its config ({config.model_type}, "
                              f"{config.num_hidden_layers} layers): " + "; ".join(problems))
    return layout


def _names(items: list[str], limit: int = 8) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _load_dtype(dtype) -> jnp.dtype:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in LOAD_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(LOAD_DTYPES)}, got {dtype!r}")
    return jnp.dtype(name)


# ---------------------------------------------------------------------------------------------
# The entry points

# The K / V fields and their head axis: the fields a replicated KV head is copied in.
_KV_HEAD_AXES = {"layers.k": 1, "layers.v": 1, "layers.k_bias": 0, "layers.v_bias": 0}


def _placed(x: np.ndarray, target) -> jax.Array:
    """x on the devices: whole on the default device, or with target a NamedSharding, each device
    given only its own slice (a host only ever sends the slices its own devices hold)."""
    if target is None:
        return jax.device_put(x)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def _param(state: nnx.State, field: str, layer: Optional[int]) -> nnx.Param:
    for key in llama.param_path(field, layer):
        state = state[key]
    return state


def mesh_config(config: ModelConfig, mesh) -> tuple[ModelConfig, int]:
    """(the config as laid out on mesh, the copies of each KV head): num_key_value_heads counts the
    copies (sharding.kv_replicas). ValueError if the mesh cannot split the heads or the MLP."""
    model = mesh.shape[sharding.MODEL]
    replicas = sharding.kv_replicas(config.num_key_value_heads, model)
    config = dataclasses.replace(config, num_key_value_heads=config.num_key_value_heads * replicas)
    llama.weight_specs(config, model)
    return config, replicas


def load_weights(folder_or_entries, config: ModelConfig, dtype="float32", mesh=None) -> llama.Llama:
    """A checkpoint's weights as a llama.Llama in `dtype`, read one tensor at a time.

    folder_or_entries: a safetensors folder, or {Hugging Face tensor name: entry} with entries as
    _Entry (dtype, shape, read()), which is how GGUF files come in (models/gguf.py).

    The model is built abstractly (nnx.eval_shape: shapes, no arrays), split, each of its params
    filled with its tensor, then merged: host memory holds one tensor at a time (in two or three
    forms) and the device one copy of the weights. With a mesh, every tensor goes straight to its
    shards (llama.weight_specs), and when the "model" axis outnumbers the KV heads, each KV head's
    K and V projections are copied sharding.kv_replicas times (adjacent copies, so each query
    group's heads stay with a copy of their KV head): the model then has mesh_config(config, mesh)[0].
    """
    dtype = _load_dtype(dtype)
    entries = (folder_or_entries if isinstance(folder_or_entries, dict)
               else _weight_entries(folder_or_entries))
    layout = _check_entries(config, entries)
    file_shapes = llama.weight_shapes(config)
    replicas, targets = 1, {}
    if mesh is not None:
        config, replicas = mesh_config(config, mesh)
        targets = {f: NamedSharding(mesh, spec) for f, spec in
                   llama.weight_specs(config, mesh.shape[sharding.MODEL]).items()}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: llama.Llama(config, dtype=dtype, rngs=nnx.Rngs(0))))
    for name, slot in tqdm(layout.items(), desc="loading weights", unit="tensor", leave=False):
        x = entries[name].read()
        x = (x.T if slot.transposed else x).reshape(file_shapes[slot.field])
        if replicas > 1 and slot.field in _KV_HEAD_AXES:
            x = np.repeat(x, replicas, axis=_KV_HEAD_AXES[slot.field])
        _param(state, slot.field, slot.layer).set_value(_placed(x.astype(dtype, copy=False), targets.get(slot.field)))
        del x
    return nnx.merge(graphdef, state)


def _generation_defaults(folder: str, config: ModelConfig) -> tuple[tuple[int, ...], Optional[int]]:
    """(eos ids, pad id) from generation_config.json where it has them, else config.json."""
    eos, pad = config.eos_token_id, config.pad_token_id
    path = os.path.join(folder, "generation_config.json")
    if os.path.exists(path):
        with open(path) as f:
            gen = json.load(f)
        if gen.get("eos_token_id") is not None:
            e = gen["eos_token_id"]
            eos = tuple(e) if isinstance(e, list) else (e,)
        if gen.get("pad_token_id") is not None:
            pad = gen["pad_token_id"]
    return eos, pad


def from_pretrained(path_or_repo_id, dtype="float32", mesh=None) -> LanguageModel:
    """Load a LlamaForCausalLM / MistralForCausalLM checkpoint (safetensors) as a LanguageModel.

    path_or_repo_id: a local folder (config.json + model.safetensors or a sharded
        model.safetensors.index.json, optionally tokenizer files and generation_config.json), or a
        Hugging Face repo id fetched through huggingface_hub.
    dtype: the weights' dtype on the device ("float32", "bfloat16" or "float16"), whatever the file's.
    mesh: a jax.sharding.Mesh with axes ("data", "model") (sparq_jax.sharding.make_mesh), or None for
        one device. Each tensor is read once and placed straight on its shards (no full copy on one
        device): attention and MLP weights split Megatron-style over "model" (llama.weight_specs),
        every later batch and KV cache split over "data" (rows) and "model" (KV heads). A "model"
        axis larger than the number of KV heads must be a multiple of it: KV heads are then
        replicated, and the returned lm.config counts the copies in num_key_value_heads.
        SparQ and H2O then select positions per copy, for its share of the query group.
    Raises CheckpointError / ConfigError (both ValueError) before any weight is read if the folder,
    its config or its tensors (names, shapes, dtypes) are wrong, and ValueError if the mesh cannot
    split the model's heads or MLP evenly.
    """
    if mesh is not None and not (isinstance(mesh, jax.sharding.Mesh)
                                 and set(mesh.axis_names) == {sharding.DATA, sharding.MODEL}):
        raise ValueError(f"mesh must be a jax.sharding.Mesh with axes ('data', 'model') "
                         f"(sparq_jax.sharding.make_mesh), got {mesh!r}")
    if mesh is not None:
        mesh = sharding.auto_axes(mesh)     # jax.make_mesh's default Explicit axes work too
    _load_dtype(dtype)
    checkpoint = open_checkpoint(path_or_repo_id)
    config = checkpoint.config
    if mesh is not None:
        mesh_config(config, mesh)                                       # mesh errors before any read
    model = load_weights(checkpoint.entries, config, dtype, mesh)
    return LanguageModel(model, tokenizer=checkpoint.tokenizer(), eos_token_id=checkpoint.eos_token_id,
                         pad_token_id=checkpoint.pad_token_id, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checked checkpoint, before any weight is read: its config, {Hugging Face tensor name: entry},
    a function that makes its tokenizer (or returns None) and the generation defaults."""

    config: ModelConfig
    entries: dict
    tokenizer: Callable[[], object]
    eos_token_id: tuple[int, ...]
    pad_token_id: Optional[int]


def open_checkpoint(path_or_repo_id) -> Checkpoint:
    """Find a checkpoint and check its config and tensors (names, shapes, dtypes): CheckpointError /
    ConfigError before any weight is read."""
    kind, folder = _resolve(path_or_repo_id)
    if kind == "gguf":
        g = gguf.open_gguf(folder)
        _check_entries(g.config, g.entries)
        return Checkpoint(g.config, g.entries, lambda: gguf.tokenizer(g), g.config.eos_token_id,
                          g.config.pad_token_id)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face checkpoint folder?")
    config = ModelConfig.from_json(config_path)
    entries = _weight_entries(folder)
    _check_entries(config, entries)
    eos, pad = _generation_defaults(folder, config)
    return Checkpoint(config, entries, lambda: _tokenizer(folder), eos, pad)


def _tokenizer(folder: str):
    if not any(os.path.exists(os.path.join(folder, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        # The fast tokenizer straight from tokenizer.json (chat template and special tokens from
        # tokenizer_config.json): AutoTokenizer would import torch to pick a class first.
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"   # generate expects left padding, as transformers' decoder-only models
    return tokenizer


def save_pretrained(model: llama.Llama, path: str) -> None:
    """Write config.json and model.safetensors (Hugging Face names and layout, the params' dtype) of a
    llama.Llama into folder `path`, loadable by from_pretrained and by transformers'
    Llama/MistralForCausalLM."""
    os.makedirs(path, exist_ok=True)
    config, state = model.config, nnx.state(model, nnx.Param)
    tensors = {name: _to_hf(np.asarray(_param(state, slot.field, slot.layer)[...]), slot)
               for name, slot in _layout(config).items()}
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
    d = config.to_dict()
    d["dtype"] = str(next(iter(tensors.values())).dtype)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2)
