"""MLP-Mixer and the token-mixer families in JAX/Flax."""
from mixer_jax import native_logs as _native_logs

_native_logs.install()  # TensorFlow's C++ start-up lines stay hidden (see native_logs)
