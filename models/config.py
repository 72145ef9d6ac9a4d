"""ModelConfig: a Llama / Mistral config.json as a frozen, hashable dataclass (static under jit).

Field names are config.json's, so a user's habits carry over. Both formats seen in the wild load:
transformers 4 (`rope_theta` + `rope_scaling`) and transformers 5 (`rope_parameters`, which holds
rope_theta too). Defaults for absent fields are transformers' (LlamaConfig / MistralConfig).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

from sparq_jax.validation import check_int

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

# The fields each scaled RoPE variant cannot do without (transformers' own validation).
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


class ConfigError(ValueError):
    """A config.json this package cannot run, with the field at fault named."""


class CheckpointError(ValueError):
    """A checkpoint (folder, GGUF file or known name) this package cannot load, with the problem named."""


@dataclasses.dataclass(frozen=True)
class RopeParameters:
    """RoPE settings (transformers 5's `rope_parameters`; `rope_scaling` + `rope_theta` in 4)."""

    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: Optional[float] = None
    # llama3
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None
    # yarn
    attention_factor: Optional[float] = None
    beta_fast: Optional[float] = None
    beta_slow: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None
    truncate: bool = True

    def to_dict(self) -> dict:
        out = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        for f in dataclasses.fields(self)[2:]:
            value = getattr(self, f.name)
            if value is not None and value != f.default:
                out[f.name] = value
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture of a LlamaForCausalLM / MistralForCausalLM checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_parameters: RopeParameters = RopeParameters()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None        # Mistral: attend to the last `sliding_window` positions
    hidden_act: str = "silu"
    bos_token_id: Optional[int] = 1
    eos_token_id: tuple[int, ...] = (2,)        # config.json may hold one id or a list
    pad_token_id: Optional[int] = None

    @property
    def grouped(self) -> bool:
        """Whether query heads share KV heads (GQA): what sq.method_from_name's `grouped` takes, so that
        every caller builds the same "sparq" for a model."""
        return self.num_key_value_heads < self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From a parsed config.json; raises ConfigError naming the field at fault."""
        if not isinstance(d, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not supported; supported model types: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        is_mistral = model_type == "mistral"
        defaults = {  # transformers' LlamaConfig / MistralConfig defaults
            "intermediate_size": 14336 if is_mistral else 11008,
            "max_position_embeddings": 4096 * 32 if is_mistral else 2048,
        }

        def get(name, default=None):
            value = d.get(name)
            return defaults.get(name, default) if value is None else value

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if name not in d:
                raise ConfigError(f"config.json has no {name!r}")
        heads = _positive_int(d, "num_attention_heads")
        hidden = _positive_int(d, "hidden_size")
        kv_heads = get("num_key_value_heads", 8 if is_mistral else heads)
        head_dim = get("head_dim", hidden // heads)
        # Llama has no sliding window; Mistral's default (absent key) is transformers' 4096.
        sliding_window = d.get("sliding_window", 4096) if is_mistral else None
        eos = get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        config = cls(
            model_type=model_type,
            vocab_size=_positive_int(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_hidden_layers=_positive_int(d, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=get("max_position_embeddings"),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            rope_parameters=_rope_parameters(d),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
            sliding_window=sliding_window,
            hidden_act=get("hidden_act", "silu"),
            bos_token_id=d.get("bos_token_id", 1),
            eos_token_id=eos,
            pad_token_id=d.get("pad_token_id"),
        )
        config.validate()
        return config

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(d)

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            _positive_int({name: getattr(self, name)}, name)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; Llama and Mistral use 'silu'")
        if self.sliding_window is not None:
            _positive_int({"sliding_window": self.sliding_window}, "sliding_window")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")

    def to_dict(self) -> dict:
        """config.json as transformers 5 writes it (rope_parameters), loadable by transformers."""
        d = {
            "architectures": ["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": self.rope_parameters.to_dict(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        else:
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        return d


def _positive_int(d: dict, name: str) -> int:
    return check_int(f"config.json: {name}", d.get(name), 1, ConfigError)


def _rope_parameters(d: dict) -> RopeParameters:
    """Both formats: transformers 5 `rope_parameters` (rope_theta inside) or 4's `rope_scaling` and
    top-level `rope_theta` (older files spell rope_type as `type`)."""
    source = "rope_parameters" if d.get("rope_parameters") is not None else "rope_scaling"
    params = dict(d.get(source) or {})
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: {source} must be an object, got {params!r}")
    if "layer_types" in d or any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"config.json: per-layer-type {source} are not supported")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"config.json: rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    theta = params.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    if rope_type in ("llama3", "yarn") and params.get("original_max_position_embeddings") is None:
        # transformers falls back to max_position_embeddings (standardize_rope_params)
        params["original_max_position_embeddings"] = d.get("original_max_position_embeddings",
                                                           d.get("max_position_embeddings"))
    for name in _ROPE_REQUIRED.get(rope_type, ()):
        if params.get(name) is None:
            raise ConfigError(f"config.json: rope type {rope_type!r} needs {source}[{name!r}]")
    known = {f.name for f in dataclasses.fields(RopeParameters)}
    kwargs = {k: v for k, v in params.items() if k in known and v is not None}
    for k in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim"):
        if k in kwargs:
            kwargs[k] = float(kwargs[k])
    return RopeParameters(rope_type=rope_type, rope_theta=float(theta), **kwargs)
