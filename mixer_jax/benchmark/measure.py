"""Timed runs on one device: the dense-matmul ceiling, and a model's inference or
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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mixer_jax import models, optim, train_config
from mixer_jax.steps import forward, init_state, train_step
from mixer_jax.benchmark.flops import model_flops, xla_flops

# Square matmul sizes tried for the ceiling, per platform: big enough to be
# compute bound, small enough to time in seconds.
STATISTICS = ("median", "min")
CEILING_SIZES = {"cpu": (1024, 2048, 4096), "default": (4096, 8192, 16384)}
DTYPES = {name: jnp.dtype(name) for name in train_config.DTYPES}


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays a clean table or JSON."""
    print(message, file=sys.stderr, flush=True)


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def time_with_ceiling(step: Callable[[], Any], matmuls: dict[int, Callable[[], Any]],
                      steps: int, repeats: int = 3, drain_s: float = 0.5,
                      statistic: str = "median") -> tuple[list[float], dict[int, list[float]]]:
    """Times `steps` calls of `step`, each followed by `repeats` calls of every matmul.

    All calls block until done and run once untimed first. Alternating gives the
    model and its ceiling the same conditions on a machine whose speed drifts
    (this 2-core VM's matmul rate moves between 105 and 155 GFLOP/s within a
    minute). A step may leave work running after it returns (the OS unmapping
    its freed buffers, unless `host_memory.retain_freed_memory()` is on): matmuls
    ran at a tenth of their speed for up to a second after a training step. So
    the smallest matmul runs for `drain_s` after each step, and the time it takes
    beyond its own (`statistic` of its timed calls) is charged to the step: the
    step pays for its tail, and the ceiling is timed on a quiet device.
    Returns the step times and the matmul times by size.
    """
    step()
    for matmul in matmuls.values():
        matmul()
    step_times, drains = [], []
    matmul_times: dict[int, list[float]] = {n: [] for n in matmuls}
    drain = matmuls[min(matmuls)] if matmuls else None
    for _ in range(steps):
        step_times.append(timed(step))
        if drain is not None:
            drains.append([timed(drain)])
            while sum(drains[-1]) < drain_s:
                drains[-1].append(timed(drain))
        for n, matmul in matmuls.items():
            matmul_times[n] += [timed(matmul) for _ in range(repeats)]
    if drain is not None:
        own = summarize(matmul_times[min(matmuls)], statistic)
        step_times = [t + max(0.0, sum(d) - len(d) * own) for t, d in zip(step_times, drains)]
    return step_times, matmul_times


def matmul_call(n: int, dtype: str) -> Callable[[], Any]:
    """One n x n @ n x n matmul in `dtype` on random data, blocking."""
    a, b = (host_random((n, n), DTYPES[dtype], seed) for seed in (0, 1))
    matmul = jax.jit(jnp.matmul)
    return lambda: matmul(a, b).block_until_ready()


def summarize(times: list[float], statistic: str) -> float:
    return statistics.median(times) if statistic == "median" else min(times)


def ceiling_figures(matmul_times: dict[int, list[float]], dtype: str,
                    statistic: str) -> dict[str, Any]:
    """The dense-matmul ceiling: the fastest size's FLOP/s (by `statistic` time)."""
    by_size = {n: 2 * n**3 / summarize(t, statistic) for n, t in matmul_times.items()}
    best = max(by_size, key=by_size.get)
    return {"dtype": dtype, "statistic": statistic, "flops_per_s": by_size[best], "size": best,
            "by_size": {str(n): f for n, f in by_size.items()},
            "calls_per_size": len(matmul_times[best])}


def compiled_memory(compiled: Any) -> dict[str, int]:
    """Per-device bytes from the compiled memory analysis; the peak is arguments +
    outputs + temporaries - donated (aliased) buffers."""
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
    return figures


def memory_figures(compiled: Any, device: jax.Device) -> dict[str, int | None]:
    """Compiled memory analysis (per device) plus the runtime peak where reported."""
    figures = compiled_memory(compiled)
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


def synthetic_batch(model: nn.Module, batch: int, image_size: int):
    """Random images in [-1, 1] and one-hot labels, made on the host with numpy
    (timing does not depend on the values; jax's RNG would add compile time)."""
    images = host_random((batch, image_size, image_size, 3), jnp.float32, seed=2)
    classes = model.num_classes or 1
    labels = np.eye(classes, dtype=np.float32)[np.arange(batch) % classes]
    return images, jnp.asarray(labels)


def synthetic_params(model: nn.Module, image_size: int) -> dict:
    """Parameters of the model's shapes and dtypes filled with small random values
    on the host: the same timing as trained weights, without compiling `init`."""
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = models.param_shapes(model, image.shape[1:])
    leaves, treedef = jax.tree.flatten(shapes)
    return jax.tree.unflatten(treedef, [host_random(s.shape, s.dtype, seed=10 + i, scale=0.05)
                                        for i, s in enumerate(leaves)])


def scannable(variant: str) -> bool:
    """Whether `variant`'s family has a scanned layout (the isotropic ones; not staged)."""
    return models.get_family(variant).block_layout is not None


def build_model(variant: str, *, dtype: str, scan: bool, remat: bool) -> nn.Module:
    """`variant` in `dtype`, its blocks scanned and/or rematerialised as asked (a staged
    model with scan=True: `registry.ScanError`, a ValueError naming the family)."""
    return models.create_model(variant, dtype=DTYPES[dtype], scan=scan, remat=remat)


def benchmark_model(variant: str, *, mode: str, batch: int, dtype: str = "float32",
                    image_size: int = 224, steps: int = 10, scan: bool = False,
                    remat: bool = False, optimizer: str = "adam",
                    microbatch: int | None = None, statistic: str = "median",
                    ceiling_sizes: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Compiles and times a model's inference call or training step on the default device
    (`variant`: any registered name).

    Parameters are float32 (`param_dtype`) and `dtype` is the compute dtype, as in
    mixed-precision training. `microbatch` runs inference `steps.forward`'s way and
    training with `accum_steps = batch // microbatch` (the same update, computed
    in cache-sized pieces). Returns images/s, step times, compile time, analytic
    and XLA FLOPs per step and the achieved FLOP/s (from the `statistic` step
    time), and memory figures. The dense-matmul ceiling (square matmuls of each of
    `ceiling_sizes`, default by platform; `()` for none) is timed alternately
    with the steps (`time_with_ceiling`), and `of_ceiling` compares the two.
    """
    if mode not in ("inference", "train"):
        raise ValueError(f"mode must be 'inference' or 'train', not {mode!r}.")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, not {statistic!r}.")
    if microbatch is not None and (microbatch < 1 or batch % microbatch):
        raise ValueError(f"--microbatch={microbatch} does not divide the batch of {batch}.")
    model = build_model(variant, dtype=dtype, scan=scan, remat=remat)
    device = jax.devices()[0]
    images, labels = synthetic_batch(model, batch, image_size)

    if mode == "inference":
        params = synthetic_params(model, image_size)
        fn = jax.jit(functools.partial(forward, model, microbatch=microbatch))
        args = (params, images)
    else:  # the training step and state exactly as training has them
        tx = recipe_optimizer(optimizer)
        init = functools.partial(init_state, model, tx, image_shape=images.shape[1:])
        state = jax.jit(init)(jax.random.PRNGKey(0))
        params = state.params
        accum_steps = batch // microbatch if microbatch else 1
        fn = jax.jit(functools.partial(train_step, model=model, tx=tx, accum_steps=accum_steps),
                     donate_argnums=0)
        args = (state, {"image": images, "label": labels})

    log(f"{variant} {mode}: compiling (batch {batch}"
        + (f" in micro-batches of {microbatch}" if microbatch else "")
        + f", {image_size}px, {dtype})...")
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

    if ceiling_sizes is None:
        ceiling_sizes = CEILING_SIZES.get(device.platform, CEILING_SIZES["default"])
    matmuls = {n: matmul_call(n, dtype) for n in ceiling_sizes}
    log(f"{variant} {mode}: timing {steps} steps"
        + (f", each followed by {'/'.join(map(str, matmuls))}^3 matmuls..." if matmuls
           else "..."))
    step_times, matmul_times = time_with_ceiling(call, matmuls, steps, statistic=statistic)
    step_s = summarize(step_times, statistic)
    analytic = model_flops(model, image_size, batch, train=mode == "train")
    counted = xla_flops(compiled)
    achieved = analytic / step_s
    # lax.scan over blocks, or over micro-batches in gradient accumulation.
    looped = scan or (mode == "train" and bool(microbatch and microbatch < batch))
    ceiling = ceiling_figures(matmul_times, dtype, statistic) if matmuls else None
    return {
        "mode": mode, "variant": variant, "batch": batch, "image_size": image_size,
        "dtype": dtype, "scan": scan, "remat": remat, "microbatch": microbatch,
        "optimizer": optimizer if mode == "train" else None,
        "compile_s": compile_s, "statistic": statistic, "steps": steps,
        "step_times_s": step_times, "median_s": statistics.median(step_times),
        "min_s": min(step_times), "step_s": step_s,
        "images_per_s": batch / step_s,
        "flops_per_step": analytic,
        "xla_flops_per_step": counted,
        # XLA counts a loop's body once.
        "xla_counts_loop_body_once": looped,
        "xla_vs_analytic": None if counted is None or looped else counted / analytic - 1,
        "achieved_flops_per_s": achieved,
        "ceiling": ceiling,
        "of_ceiling": None if ceiling is None else achieved / ceiling["flops_per_s"],
        "memory": memory_figures(compiled, device),
        "param_count": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
    }
