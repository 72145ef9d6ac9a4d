"""Side-by-side timing: the candidates run interleaved, repetition after repetition, and each reports
the median after warm-up, so that speedups are ratios of medians measured under the same load."""
from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def time_interleaved(fns: dict, args: dict, reps: int, warmup: int, inner: int = 1) -> dict[str, float]:
    """Median milliseconds of each fns[name](*args[name]), run round-robin.

    Each sample dispatches the call `inner` times back to back and waits once, so that on an
    accelerator the host's dispatch overlaps the device's work (a decode loop is one program there).
    """
    for name, fn in fns.items():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args[name]))
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            outs = [fn(*args[name]) for _ in range(inner)]
            jax.block_until_ready(outs)
            samples[name].append((time.perf_counter() - start) * 1e3 / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


def drop_failing(fns: dict, args: dict, rows: dict = None) -> None:
    """Run each fns[name](*args[name]) once; one that raises (a kernel that does not compile on this
    device) is reported and dropped, so that the others are still timed."""
    for name in list(fns):
        try:
            jax.block_until_ready(fns[name](*args[name]))
        except Exception as err:  # noqa: BLE001 - reported, the run goes on without it
            print(f"{name} failed and is left out: {type(err).__name__}: {str(err)[:2000]}", file=sys.stderr)
            del fns[name], args[name]
            if rows is not None:
                rows.pop(name, None)


def environment() -> dict:
    """Where a result was measured: {"backend", "device", "jax"}."""
    return {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}

