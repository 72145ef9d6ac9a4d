"""XLA flags this package sets for itself on a GPU: whole decode loops in CUDA graphs.

XLA:GPU records runs of kernels into command buffers (CUDA graphs), so that a decode step costs a
few graph launches instead of one launch per kernel. Pallas Triton calls lower to kernel thunks, which
the default command types (FUSION among them) already admit: the `__gpu$xla.gpu.triton` flag of jax
issue #27988 (`--legacy_command_buffer_custom_call_targets`) is gone from XLA in the jax versions this
package supports, and an unknown flag in XLA_FLAGS aborts the process. What the defaults leave out is
control flow: a `lax.while_loop` (generate's decode loop) runs its body from the host, one iteration
at a time, reading the loop condition back each step. Adding WHILE and CONDITIONAL (CUDA 12.3+ graph
conditionals) lets XLA capture the whole loop.

The flag is added to XLA_FLAGS at import, before any backend starts, when a CUDA backend may be used
and the user has not set --xla_gpu_enable_command_buffer themselves (theirs always wins).
"""
from __future__ import annotations

import importlib.util
import os
import re
from typing import Mapping, Optional

FLAG = "--xla_gpu_enable_command_buffer"
# "+TYPE" adds to XLA's default command types instead of replacing them.
VALUE = "+WHILE,+CONDITIONAL"

# jax's CUDA plugins (jax[cuda12] / jax[cuda13]) register under these module names.
_CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13", "jax_cuda12_plugin", "jax_cuda13_plugin")


def with_command_buffer_flag(xla_flags: Optional[str]) -> Optional[str]:
    """XLA_FLAGS with the command-buffer flag appended, or None when it names that flag already
    (the user's setting is kept as it is)."""
    xla_flags = xla_flags or ""
    if re.search(rf"(^|\s){re.escape(FLAG)}(=|\s|$)", xla_flags):
        return None
    return f"{xla_flags} {FLAG}={VALUE}".strip()


def may_use_cuda(env: Mapping[str, str], plugin_installed: bool) -> bool:
    """Whether jax may start a CUDA backend: a CUDA plugin is installed and JAX_PLATFORMS, if set,
    allows cuda (or gpu)."""
    if not plugin_installed:
        return False
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    return not platforms or bool({"cuda", "gpu"} & {p.strip() for p in platforms.split(",")})


def _cuda_plugin_installed() -> bool:
    for name in _CUDA_PLUGINS:
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except (ImportError, ValueError):
            continue
    return False


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge._backends)
    except Exception:  # noqa: BLE001 - a jax without this private name: assume not started
        return False


def configure(env=os.environ) -> bool:
    """Add the flag to env["XLA_FLAGS"] if a CUDA backend may be used, none has started yet (XLA
    reads its flags once) and the user has not set it. Returns whether XLA_FLAGS was changed."""
    if not may_use_cuda(env, _cuda_plugin_installed()) or _backends_started():
        return False
    flags = with_command_buffer_flag(env.get("XLA_FLAGS"))
    if flags is None:
        return False
    env["XLA_FLAGS"] = flags
    return True
