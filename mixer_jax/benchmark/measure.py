"""Timed runs on one device: the dense-matmul ceiling, and a Mixer's inference or
training step (throughput, FLOPs, compile time, memory).

Throughput figures use one statistic of the timed calls for the model and the
ceiling alike: the median by default, or the minimum (`statistic="min"`), the
better estimate of what the hardware can do on a machine shared with other work.
Both are always recorded.
"""
from __future__ import annotations

import functools
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixer_jax import models, optim, train_config
from mixer_jax.steps import init_state, train_step
from mixer_jax.benchmark.flops import mixer_flops, xla_flops

# Square matmul sizes tried for the ceiling, per platform: big enough to be
# compute bound, small enough to time in seconds.
STATISTICS = ("median", "min")
CEILING_SIZES = {"cpu": (1024, 2048, 4096), "default": (4096, 8192, 16384)}
DTYPES = {name: jnp.dtype(name) for name in train_config.DTYPES}


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays a clean table or JSON."""
    print(message, file=sys.stderr, flush=True)


def time_calls(calls: dict[str, Callable[[], Any]], steps: int) -> dict[str, dict]:
    """Times `steps` rounds of `calls` (each must block until done), one warm-up each.

    The calls alternate within every round, so that on a machine shared with other
    work each sees the same conditions (a model and its ceiling, say).
    """
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(steps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "steps": steps}
            for name, t in times.items()}


def matmul_call(n: int, dtype: str) -> Callable[[], Any]:
    """One n x n @ n x n matmul in `dtype` on random data, blocking."""
    a, b = (host_random((n, n), DTYPES[dtype], seed) for seed in (0, 1))
    matmul = jax.jit(jnp.matmul)
    return lambda: matmul(a, b).block_until_ready()


def matmul_ceiling(dtype: str = "float32", sizes: tuple[int, ...] | None = None,
                   steps: int = 5, statistic: str = "median") -> dict[str, Any]:
    """Measured dense-matmul throughput of the default device: the best of square
    n x n @ n x n products in `dtype` (FLOP/s from each size's `statistic` time)."""
    platform = jax.devices()[0].platform
    sizes = sizes or CEILING_SIZES.get(platform, CEILING_SIZES["default"])
    by_size = {}
    for n in sizes:
        log(f"  matmul ceiling: timing {n}x{n} @ {n}x{n} ({dtype})...")
        timing = time_calls({"matmul": matmul_call(n, dtype)}, steps)["matmul"]
        by_size[n] = 2 * n**3 / timing[f"{statistic}_s"]
    best = max(by_size, key=by_size.get)
    return {"dtype": dtype, "statistic": statistic, "flops_per_s": by_size[best], "size": best,
            "by_size": {str(n): f for n, f in by_size.items()}}


def memory_figures(compiled: Any, device: jax.Device) -> dict[str, int | None]:
    """Compiled memory analysis (per device) plus the runtime peak where reported."""
    analysis = compiled.memory_analysis()
    figures = {
        "argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
        "alias_bytes": analysis.alias_size_in_bytes,
        "temp_bytes": analysis.temp_size_in_bytes,
    }
    figures["compiled_peak_bytes"] = (
        figures["argument_bytes"] + figures["output_bytes"]
        + figures["temp_bytes"] - figures["alias_bytes"])
    stats = device.memory_stats() or {}
    figures["device_peak_bytes"] = stats.get("peak_bytes_in_use")  # None on CPU
    return figures


# The paper's two recipes as training-config overrides: pre-training (Adam with
# decoupled weight decay, 2 states per parameter) and fine-tuning (SGD with
# momentum, 1 state; `base_config`'s defaults).
OPTIMIZER_RECIPES = {
    "adam": dict(optim="adamw", base_lr=1e-3, weight_decay=0.1, decay_type="linear"),
    "sgd": dict(optim="sgd"),
}


def recipe_optimizer(name: str) -> optax.GradientTransformation:
    """The training optimizer (`optim.make_optimizer`) of recipe 'adam' or 'sgd'."""
    if name not in OPTIMIZER_RECIPES:
        raise ValueError(f"Unknown optimizer {name!r}; use one of {sorted(OPTIMIZER_RECIPES)}.")
    config = train_config.base_config()
    config.update(OPTIMIZER_RECIPES[name])
    return optim.make_optimizer(config)[0]


def host_random(shape: tuple[int, ...], dtype: Any, seed: int, scale: float = 1.0) -> jax.Array:
    """Uniform random values in [-scale, scale), drawn with numpy on the host: no
    compile per shape as with jax's RNG. Random, not constant, data: some
    accelerators run faster (cooler) on constant inputs."""
    values = np.random.default_rng(seed).random(shape, np.float32)
    return jnp.asarray(scale * (2 * values - 1), dtype)


def synthetic_batch(model: models.MlpMixer, batch: int, image_size: int):
    """Random images in [-1, 1] and one-hot labels, made on the host with numpy
    (timing does not depend on the values; jax's RNG would add compile time)."""
    images = host_random((batch, image_size, image_size, 3), jnp.float32, seed=2)
    classes = model.num_classes or 1
    labels = np.eye(classes, dtype=np.float32)[np.arange(batch) % classes]
    return images, jnp.asarray(labels)


def synthetic_params(model: models.MlpMixer, image_size: int) -> dict:
    """Parameters of the model's shapes and dtypes filled with small random values
    on the host: the same timing as trained weights, without compiling `init`."""
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), image)["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    return jax.tree.unflatten(treedef, [host_random(s.shape, s.dtype, seed=10 + i, scale=0.05)
                                        for i, s in enumerate(leaves)])


def benchmark_model(variant: str, *, mode: str, batch: int, dtype: str = "float32",
                    image_size: int = 224, steps: int = 10, scan: bool = False,
                    remat: bool = False, optimizer: str = "adam",
                    statistic: str = "median", ceiling: dict | None = None) -> dict[str, Any]:
    """Compiles and times a Mixer inference call or training step on the default device.

    Parameters are float32 (`param_dtype`) and `dtype` is the compute dtype, as in
    mixed-precision training. Returns images/s, step times, compile time, analytic
    and XLA FLOPs per step and the achieved FLOP/s (from the `statistic` step
    time), and memory figures. With `ceiling` (a `matmul_ceiling` result), its
    best size is timed again alternately with the steps, so that both see the same
    conditions on a busy machine; `ceiling_flops_per_s` is the higher of the two
    measurements, so work spilling from a step into the matmul's timing can never
    flatter `of_ceiling`.
    """
    if mode not in ("inference", "train"):
        raise ValueError(f"mode must be 'inference' or 'train', not {mode!r}.")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, not {statistic!r}.")
    model = models.create_model(variant, dtype=DTYPES[dtype], scan=scan, remat=remat)
    device = jax.devices()[0]
    images, labels = synthetic_batch(model, batch, image_size)

    if mode == "inference":
        params = synthetic_params(model, image_size)
        fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
        args = (params, images)
    else:  # the training step and state exactly as training has them
        tx = recipe_optimizer(optimizer)
        init = functools.partial(init_state, model, tx, image_shape=images.shape[1:])
        state = jax.jit(init)(jax.random.PRNGKey(0))
        params = state.params
        fn = jax.jit(functools.partial(train_step, model=model, tx=tx), donate_argnums=0)
        args = (state, {"image": images, "label": labels})

    log(f"{variant} {mode}: compiling (batch {batch}, {image_size}px, {dtype})...")
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start

    if mode == "inference":
        call = lambda: compiled(*args).block_until_ready()
    else:
        state = [args[0]]  # donated each step, so keep the newest

        def call():  # waits for the whole new state, not just the metrics
            state[0], metrics = compiled(state[0], args[1])
            jax.block_until_ready((state[0], metrics))

    calls = {"model": call}
    ceiling_size = ceiling["size"] if ceiling else None
    if ceiling_size:
        calls["ceiling"] = matmul_call(ceiling_size, dtype)
    log(f"{variant} {mode}: timing {steps} steps"
        + (f", alternating with a {ceiling_size}^3 matmul..." if ceiling_size else "..."))
    timings = time_calls(calls, steps)
    timing = timings["model"]
    analytic = mixer_flops(model, image_size, batch, train=mode == "train")
    counted = xla_flops(compiled)
    alongside = (2 * ceiling_size**3 / timings["ceiling"][f"{statistic}_s"]
                 if ceiling_size else None)
    best = max(ceiling["flops_per_s"], alongside) if ceiling_size else None
    achieved = analytic / timing[f"{statistic}_s"]
    return {
        "mode": mode, "variant": variant, "batch": batch, "image_size": image_size,
        "dtype": dtype, "scan": scan, "remat": remat,
        "optimizer": optimizer if mode == "train" else None,
        "compile_s": compile_s, **timing, "statistic": statistic,
        "step_s": timing[f"{statistic}_s"],
        "images_per_s": batch / timing[f"{statistic}_s"],
        "flops_per_step": analytic,
        "xla_flops_per_step": counted,
        "xla_vs_analytic": None if counted is None else counted / analytic - 1,
        "achieved_flops_per_s": achieved,
        "ceiling_size": ceiling_size, "ceiling_flops_per_s": best,
        "ceiling_alongside_flops_per_s": alongside,
        "of_ceiling": None if best is None else achieved / best,
        "memory": memory_figures(compiled, device),
        "param_count": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
    }
