"""Benchmarks for MLP-Mixer: throughput, FLOPs, memory, sharding plans, input pipeline.

Command line: `python -m mixer_jax.benchmark --help` (see `__main__.py`). Modules:
  flops     analytic FLOP counts (`mixer_flops`) and XLA's count (`xla_flops`);
  measure   the dense-matmul ceiling and timed inference / training steps;
  sharding  per-device memory under data parallelism vs FSDP from abstract shapes;
  pipeline  images/s of the training input pipeline alone;
  mixing    time of each mixed-sample augmentation method alone;
  report    readable tables.
"""
from mixer_jax.benchmark.flops import forward_flops_terms, mixer_flops, xla_flops
from mixer_jax.benchmark.measure import benchmark_model
from mixer_jax.benchmark.pipeline import benchmark_pipeline
from mixer_jax.benchmark.sharding import sharding_memory

__all__ = [
    "benchmark_model", "benchmark_pipeline", "forward_flops_terms", "mixer_flops",
    "sharding_memory", "xla_flops",
]
