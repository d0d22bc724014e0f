"""Benchmarks for every registered model: throughput, FLOPs, memory, sharding plans,
input pipeline, and side by side with timm.

Command line: `python -m mixer_jax.benchmark --help` (see `__main__.py`). Modules:
  flops     analytic FLOP counts (`model_flops`, via `Family.flops`) and XLA's (`xla_flops`);
  compare   the same model in timm, each framework in its own process, alternately;
  measure   the dense-matmul ceiling and timed inference / training steps;
  sharding  per-device memory under data parallelism vs FSDP from abstract shapes;
  pipeline  images/s of the training input pipeline alone;
  mixing    time of each mixed-sample augmentation method alone;
  report    readable tables.
"""
from mixer_jax.benchmark.flops import forward_flops_terms, mixer_flops, model_flops, xla_flops
from mixer_jax.benchmark.measure import benchmark_model
from mixer_jax.benchmark.pipeline import benchmark_pipeline
from mixer_jax.benchmark.sharding import sharding_memory

__all__ = [
    "benchmark_model", "benchmark_pipeline", "forward_flops_terms", "mixer_flops",
    "model_flops", "sharding_memory", "xla_flops",
]
