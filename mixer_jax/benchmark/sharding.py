"""Per-device memory of a training step under data parallelism vs FSDP, planned
from abstract shapes: nothing is allocated, the step is only lowered and
compiled for a mesh of (possibly simulated) devices, so Mixer-H/14 on 256
devices can be planned on one CPU.

Parameter and optimizer bytes come from each array's shard shape; the compiled
memory analysis gives the step's arguments (params + optimizer + batch, which
cross-checks the former), temporaries (activations, gradients, gathered
weights) and outputs, all per device.
"""
from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mixer_jax import models
from mixer_jax.benchmark.measure import DTYPES, log, make_optimizer, make_train_step

STRATEGIES = ("data", "fsdp")


# The token axis (S, the number of patches) of token-mixing weights, counted from
# the end. Sharding it makes XLA split activations by token, i.e. the images by
# space, and replicate whole batches to get there (seen for Mixer-H/14 on 256
# devices: 2.4 TiB of temporaries instead of 45 GiB), so FSDP never picks it.
_TOKEN_AXIS = {("Dense_0", "kernel"): -2, ("Dense_1", "kernel"): -1, ("Dense_1", "bias"): -1}
DEFAULT_FSDP_MIN_SIZE = 2**16  # elements; smaller arrays stay replicated


def fsdp_spec(path: tuple, shape: tuple[int, ...], num_shards: int,
              min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
    """Shards the largest dimension divisible by `num_shards` over 'data'.

    Arrays under `min_size` elements, or with no such dimension, stay replicated.
    Never sharded: the leading block axis of scanned parameters (the scan slices
    along it) and the token axis of token-mixing weights (see `_TOKEN_AXIS`).
    """
    names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
    excluded = {0} if models.SCANNED_BLOCKS in names else set()
    if "token_mixing" in names and tuple(names[-2:]) in _TOKEN_AXIS:
        excluded.add(len(shape) + _TOKEN_AXIS[tuple(names[-2:])])
    candidates = [d for d in range(len(shape))
                  if d not in excluded and shape[d] % num_shards == 0]
    if math.prod(shape) < min_size or not candidates:
        return P()
    dim = max(candidates, key=lambda d: shape[d])
    return P(*(["data" if d == dim else None for d in range(len(shape))]))


def tree_shardings(tree: Any, mesh: Mesh, strategy: str,
                   fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
    """NamedShardings for every leaf of an abstract tree under `strategy`."""
    if strategy == "data":
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)
    if strategy == "fsdp":
        return jax.tree_util.tree_map_with_path(lambda path, x: NamedSharding(
            mesh, fsdp_spec(path, x.shape, mesh.size, fsdp_min_size)), tree)
    raise ValueError(f"Unknown strategy {strategy!r}; known: {STRATEGIES}.")


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` laid out with `shardings`."""
    sizes = jax.tree.map(
        lambda x, s: math.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize,
        tree, shardings)
    return int(sum(jax.tree.leaves(sizes)))


def mesh_of(num_devices: int) -> Mesh:
    """A 1-D 'data' mesh: the default backend's devices, else simulated CPU ones."""
    devices = jax.devices()
    if len(devices) < num_devices:
        devices = jax.devices("cpu")
    if len(devices) < num_devices:
        raise ValueError(
            f"A mesh of {num_devices} devices needs that many devices; this process has "
            f"{len(devices)}. Simulate them on CPU by running the benchmark command with "
            f"--mesh (it sets jax_num_cpu_devices before jax starts), or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices}.")
    return jax.make_mesh((num_devices,), ("data",), axis_types=(AxisType.Auto,),
                         devices=devices[:num_devices])


def sharding_memory(variant: str, *, num_devices: int, batch_per_device: int,
                    strategy: str, dtype: str = "float32", image_size: int = 224,
                    optimizer: str = "adam", scan: bool = True, remat: bool = False,
                    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE) -> dict[str, Any]:
    """Per-device memory of one training step of `variant` under `strategy`
    ('data' or 'fsdp') on `num_devices` devices, from abstract shapes only."""
    model = models.create_model(variant, dtype=DTYPES[dtype], scan=scan, remat=remat)
    tx = make_optimizer(optimizer)
    mesh = mesh_of(num_devices)
    batch = batch_per_device * num_devices
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), image)["params"]
    opt_state = jax.eval_shape(tx.init, params)
    state = (params, opt_state)
    state_sharding = tree_shardings(state, mesh, strategy, fsdp_min_size)
    batch_sharding = NamedSharding(mesh, P("data"))
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32,
                                  sharding=batch_sharding)
    labels = jax.ShapeDtypeStruct((batch, model.num_classes), jnp.float32,
                                  sharding=batch_sharding)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)

    log(f"{variant} {strategy} on {num_devices} devices: compiling the training step "
        f"(per-device batch {batch_per_device})...")
    step = jax.jit(make_train_step(model, tx), donate_argnums=0,
                   out_shardings=(state_sharding, NamedSharding(mesh, P())))
    start = time.perf_counter()
    analysis = step.lower(abstract_state, images, labels).compile().memory_analysis()
    compile_s = time.perf_counter() - start
    return {
        "variant": variant, "strategy": strategy, "devices": num_devices,
        "batch_per_device": batch_per_device, "image_size": image_size, "dtype": dtype,
        "optimizer": optimizer, "scan": scan, "remat": remat, "fsdp_min_size": fsdp_min_size,
        "param_bytes": bytes_per_device(params, state_sharding[0]),
        "optimizer_bytes": bytes_per_device(opt_state, state_sharding[1]),
        "argument_bytes": analysis.argument_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "alias_bytes": analysis.alias_size_in_bytes,
        "total_bytes": (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
                        + analysis.output_size_in_bytes - analysis.alias_size_in_bytes),
        "compile_s": compile_s,
    }
