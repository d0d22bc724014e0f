"""Step-time cost of each mixed-sample augmentation method (`mixer_jax.mix`).

Each method alone (`mix.alone`) is compiled and timed on its own, on the batch
the training step would get, so its cost can be read against a training step
of the same variant and batch (`--mode=train,mix` reports the ratio).
"""
from __future__ import annotations

import functools
import statistics
from typing import Any

import jax

from mixer_jax import mix, models
from mixer_jax.benchmark import measure


def benchmark_mixing(variant: str, *, batch: int, image_size: int = 224, steps: int = 10,
                     mode: str = "batch", statistic: str = "median") -> list[dict[str, Any]]:
    """One row per method: seconds per call of `mix.mix` on `batch` random images."""
    model = models.create_model(variant)
    images, labels = measure.synthetic_batch(model, batch, image_size)
    key = jax.random.PRNGKey(0)
    rows = []
    for method in mix.METHODS:
        fn = jax.jit(functools.partial(mix.mix, cfg=mix.alone(method, mode=mode),
                                       patch_size=model.patch_size))
        measure.log(f"{variant} mixing {method} ({mode} mode): compiling and timing...")
        jax.block_until_ready(fn(images, labels, key))
        times = [measure.timed(lambda: jax.block_until_ready(fn(images, labels, key)))
                 for _ in range(steps)]
        rows.append({"method": method, "variant": variant, "batch": batch, "mode": mode,
                     "image_size": image_size, "step_times_s": times,
                     "median_s": statistics.median(times),
                     "step_s": measure.summarize(times, statistic)})
    return rows
