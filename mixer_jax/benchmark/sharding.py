"""Per-device memory of a training step under data parallelism vs FSDP, planned
from abstract shapes: nothing is allocated, the step is only lowered and
compiled for a mesh of (possibly simulated) devices, so Mixer-H/14 on 256
devices can be planned on one CPU.

Parameter and optimizer bytes come from each array's shard shape; the compiled
memory analysis gives the step's arguments (params + optimizer + batch + step
count and RNG key, which cross-checks the former), temporaries (activations, gradients, gathered
weights) and outputs, all per device. The sharding rule, the step and the
optimizer are training's own (`parallel`, `steps`, `optim`).
"""
from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from mixer_jax import parallel
from mixer_jax.benchmark.measure import build_model, compiled_memory, log, recipe_optimizer

STRATEGIES = ("data", "fsdp")


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of an abstract `tree` (leaves with a `.sharding`)."""
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))


def mesh_of(num_devices: int) -> jax.sharding.Mesh:
    """`parallel.make_mesh` over `num_devices` of the default backend's devices, else
    simulated CPU ones ('model' axis of size 1)."""
    devices = jax.devices()
    if len(devices) < num_devices:
        devices = jax.devices("cpu")
    if len(devices) < num_devices:
        raise ValueError(
            f"A mesh of {num_devices} devices needs that many devices; this process has "
            f"{len(devices)}. Simulate them on CPU by running the benchmark command with "
            f"--mesh (it sets jax_num_cpu_devices before jax starts), or set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices}.")
    return parallel.make_mesh(1, devices[:num_devices])


def sharding_memory(variant: str, *, num_devices: int, batch_per_device: int,
                    strategy: str, dtype: str = "float32", image_size: int = 224,
                    optimizer: str = "adam", scan: bool = True, remat: bool = False,
                    fsdp_min_size: int = parallel.DEFAULT_FSDP_MIN_SIZE) -> dict[str, Any]:
    """Per-device memory of one training step of `variant` under `strategy`
    ('data' or 'fsdp') on `num_devices` devices, from abstract shapes only.

    The step and the state's layout are training's own (`parallel.MeshStrategy`
    running `steps.train_step`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown strategy {strategy!r}; known: {STRATEGIES}.")
    model = build_model(variant, dtype=dtype, scan=scan, remat=remat)
    runner = parallel.MeshStrategy(
        model, recipe_optimizer(optimizer), image_shape=(image_size, image_size, 3),
        mesh=mesh_of(num_devices), fsdp=strategy == "fsdp", fsdp_min_size=fsdp_min_size)
    batch = batch_per_device * num_devices
    batch_shapes = {
        "image": jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch, model.num_classes), jnp.float32),
    }
    state = runner.abstract_state()

    log(f"{variant} {strategy} on {num_devices} devices: compiling the training step "
        f"(per-device batch {batch_per_device})...")
    start = time.perf_counter()
    memory = compiled_memory(runner.lower_train_step(batch_shapes).compile())
    compile_s = time.perf_counter() - start
    total_bytes = memory.pop("compiled_peak_bytes")
    return {
        "variant": variant, "strategy": strategy, "devices": num_devices,
        "batch_per_device": batch_per_device, "image_size": image_size, "dtype": dtype,
        "optimizer": optimizer, "scan": scan, "remat": remat, "fsdp_min_size": fsdp_min_size,
        "param_bytes": bytes_per_device(state.params),
        "optimizer_bytes": bytes_per_device(state.opt_state),
        **memory, "total_bytes": total_bytes,
        "compile_s": compile_s,
    }
