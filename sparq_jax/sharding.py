"""Decoding over a device mesh: the mesh, the KV cache's partition specs, and attention per shard.

The mesh has two axes: "data" splits the batch, "model" splits the KV heads (tensor parallelism).
SparQ's selection is per row and per KV head (the paper, Alg. 1), so once both are split every
device attends over its own rows and heads with no communication. append_and_attend makes that
explicit with shard_map instead of leaving it to the SPMD partitioner, which cannot see that the
flattened row gathers of attention.py stay inside a shard (and would insert collectives), and so
that the Pallas kernels see plain per-device arrays.

    from sparq_jax import sharding
    mesh = sharding.make_mesh(data=2, model=4)
    cache = sharding.shard_cache(cache, mesh)
"""
from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from .attention import attend
from .cache import KVCache
from .validation import check_int

DATA, MODEL = "data", "model"


def make_mesh(data: int, model: int, devices=None) -> jax.sharding.Mesh:
    """A ("data", "model") mesh of data * model devices (default: all of jax.devices(), every host's).

    jax.make_mesh orders the devices so that the "model" axis, which carries the per-layer
    all-reduces, lies along the fastest links (within a host, a TPU slice's torus).
    """
    for name, value in (("data", data), ("model", model)):
        check_int(name, value)
    devices = jax.devices() if devices is None else list(devices)
    if data * model != len(devices):
        raise ValueError(f"data * model must equal the number of devices: data={data} x model={model} = "
                         f"{data * model}, but there are {len(devices)} devices")
    # Auto axes: the partitioner propagates shardings (explicit sharding would need out_sharding
    # annotations on every ambiguous op), whatever the jax version's default.
    return jax.make_mesh((int(data), int(model)), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def auto_axes(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """mesh with Auto axis types (same devices, same axis names). jax.make_mesh gives Explicit axes
    by default, under which every ambiguous op (an embedding gather, ...) needs an out_sharding;
    this package's code relies on the partitioner's propagation instead."""
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def kv_replicas(num_kv_heads: int, model: int) -> int:
    """How many copies of each KV head a "model" axis of this size needs.

    1 when model divides num_kv_heads; model // num_kv_heads when model is a multiple of it (each
    KV head then lives on model // num_kv_heads devices, as in vLLM and MaxText); anything else
    cannot split the heads evenly and raises ValueError.
    """
    if num_kv_heads % model == 0:
        return 1
    if model % num_kv_heads == 0:
        return model // num_kv_heads
    raise ValueError(f"the mesh's 'model' axis size ({model}) must divide the number of KV heads "
                     f"({num_kv_heads}) or be a multiple of it; got model={model}, "
                     f"num_key_value_heads={num_kv_heads}")


def cache_specs(cache: KVCache) -> KVCache:
    """The PartitionSpecs of a cache's fields (None where a field is absent): rows over "data", KV
    heads over "model"; K, K^T, V, the V sum and H2O's scores alike; positions and D never split."""
    heads = P(DATA, MODEL, None, None)
    per_head = P(DATA, MODEL, None)
    return KVCache(k=heads, kt=None if cache.kt is None else heads, v=heads, v_sum=per_head,
                   lengths=P(DATA), h2o_scores=None if cache.h2o_scores is None else per_head)


def check_cache(cache: KVCache, mesh: jax.sharding.Mesh) -> None:
    """ValueError unless the mesh splits the cache's batch and KV heads evenly."""
    data, model = mesh.shape[DATA], mesh.shape[MODEL]
    if cache.batch % data:
        raise ValueError(f"the batch ({cache.batch} rows) must be a multiple of the mesh's 'data' axis "
                         f"size ({data})")
    if cache.num_kv_heads % model:
        raise ValueError(f"the cache's KV heads ({cache.num_kv_heads}) must be a multiple of the mesh's "
                         f"'model' axis size ({model}); replicate KV heads first (see kv_replicas)")


def cache_sharding(cache: KVCache, mesh: jax.sharding.Mesh) -> KVCache:
    """cache_specs as NamedShardings on mesh."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), cache_specs(cache),
                        is_leaf=lambda x: isinstance(x, P))


def shard_cache(cache: KVCache, mesh: jax.sharding.Mesh) -> KVCache:
    """The cache placed on the mesh (each device gets its rows and KV heads only)."""
    check_cache(cache, mesh)
    return jax.device_put(cache, cache_sharding(cache, mesh))


def constrain_cache(cache: KVCache, mesh: jax.sharding.Mesh) -> KVCache:
    """Inside jit: pin the cache to its sharding, so the partitioner never gathers it."""
    return jax.lax.with_sharding_constraint(cache, cache_sharding(cache, mesh))


def append_and_attend(q, k_new, v_new, cache: KVCache, method, *, mesh: Optional[jax.sharding.Mesh] = None,
                      window: Optional[int] = None, impl: str = "auto", interpret: bool = False):
    """cache.append(k_new, v_new) then sq.attend(q, cache, method): one decode step of one layer.

    q [B, Hq, D]; k_new, v_new [B, Hkv, T, D]. With a mesh, both run under shard_map on each
    device's rows and KV heads (q's heads split alike, so each device keeps whole query groups):
    returns (out [B, Hq, D], cache) sharded as cache_specs, with no collective in between.
    """
    def local(q, k_new, v_new, cache):
        return attend(q, cache.append(k_new, v_new), method, window=window, impl=impl, interpret=interpret)

    if mesh is None:
        return local(q, k_new, v_new, cache)
    check_cache(cache, mesh)
    heads = P(DATA, MODEL, None, None)
    specs = cache_specs(cache)
    # check_vma=False: attention.py's loops start from constants (replicated) and carry per-shard
    # values, which the varying-axes checker rejects; every output here is per shard by construction.
    return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA, MODEL, None), heads, heads, specs),
                         out_specs=(P(DATA, MODEL, None), specs), check_vma=False)(q, k_new, v_new, cache)
