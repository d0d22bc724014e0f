"""Test setup, done before jax is imported anywhere (subprocesses inherit it).

- 8 simulated CPU devices, for the pmap / mesh / FSDP tests.
- A persistent compilation cache: many tests and their subprocesses compile the
  same programs; a cached program is the same program, so results are unchanged.
"""
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mixer_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# torch (test extra, for the timm parity tests) imports triton if installed, and
# triton's native library crashes the process when TensorFlow was loaded first.
# CPU torch never needs triton: make `import triton` fail (torch then skips it).
sys.modules.setdefault("triton", None)
