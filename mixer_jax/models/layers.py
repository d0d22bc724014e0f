"""Layers shared by several families."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def drop_path(x: jax.Array, rate, rng: jax.Array) -> jax.Array:
    """Zeroes whole examples with probability `rate`, scales the rest by 1/(1-rate)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    # `keep` may be 0 only for rate 1; guard the division.
    return jnp.where(mask, x / jnp.maximum(keep, 1e-12), 0).astype(x.dtype)


def dense(features: int, axes: tuple[str | None, str | None], *, dtype, param_dtype,
          name: str | None = None, use_bias: bool = True,
          kernel_init=nn.initializers.lecun_normal()) -> nn.Dense:
    """`nn.Dense` whose kernel carries logical axes `axes` (in, out), its bias `axes[1]`."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


def layer_norm(axis: str = "embed", *, dtype, param_dtype, name: str | None = None,
               epsilon: float = 1e-6, use_bias: bool = True) -> nn.LayerNorm:
    """`nn.LayerNorm` over the last axis, whose scale and bias carry logical axis `axis`."""
    return nn.LayerNorm(
        epsilon=epsilon, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis,)))
