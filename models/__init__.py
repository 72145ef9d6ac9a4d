"""Flax NNX ports of Llama and Mistral, loaded from Hugging Face checkpoints.

    import models, sparq_jax as sq
    lm = models.from_pretrained("path/to/checkpoint")   # a folder, a .gguf, "smollm2-135m-instruct", a repo id
    ids = lm.generate(input_ids, attention_mask, method=sq.SparQ(rank=16, top_k=256))

(The top-level name `models` is generic; it is this project's package.)
"""
from .config import CheckpointError, ConfigError, ModelConfig, RopeParameters
from .hf import BUNDLED, from_pretrained, save_pretrained
from .known import KNOWN_MODELS
from .llama import Llama, init_model
from .lm import LanguageModel, TransferMeter, bucket_length, prefill_options
from .tokenizer import byte_tokenizer


def __getattr__(name):
    # models.evaluation and models.cli load on first use: `import models` stays the model alone.
    if name in ("cli", "evaluation"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BUNDLED", "CheckpointError", "ConfigError", "KNOWN_MODELS", "LanguageModel", "Llama", "ModelConfig",
           "RopeParameters", "TransferMeter", "bucket_length", "prefill_options", "byte_tokenizer", "from_pretrained", "init_model", "save_pretrained"]
