"""Throughput of the training input pipeline alone (decode, augment, batch), to
compare with the training step's images/s and see which one is the bottleneck."""
from __future__ import annotations

import time
from typing import Any

from mixer_jax.benchmark.measure import log


def benchmark_pipeline(config: Any, *, batches: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Images/s of `input_pipeline.train_dataset(config)` on this host.

    The first `warmup` batches (shuffle buffer fill, tf.data start-up) are not timed.
    """
    from mixer_jax import input_pipeline  # imports TensorFlow: only when asked for

    log(f"pipeline {config.dataset}: starting (host batch of global {config.batch})...")
    iterator = input_pipeline.train_dataset(config).as_numpy_iterator()
    for _ in range(warmup):
        next(iterator)
    log(f"pipeline {config.dataset}: timing {batches} batches...")
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        images += len(next(iterator)["image"])
    seconds = time.perf_counter() - start
    return {
        "mode": "pipeline", "dataset": config.dataset, "batch": config.batch,
        "host_batch": images // batches, "crop": config.pp.crop, "batches": batches,
        "batch_s": seconds / batches, "images_per_s": images / seconds,
    }
