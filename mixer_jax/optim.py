"""Optimizers and learning-rate schedules, chosen by config (vit_jax key names).

Two recipes from the paper, both as one optax chain
`clip_by_global_norm -> [coupled L2] -> optimizer(schedule)`:
- fine-tuning: `optim='sgd'`, `momentum=0.9`, warmup + `decay_type='cosine'`,
  no weight decay, optional `mu_dtype='bfloat16'` (momentum kept in bfloat16,
  as the original code does to save memory);
- pre-training: `optim='adam'` or `'adamw'` (b1=0.9, b2=0.999), warmup +
  `decay_type='linear'`, `weight_decay`.

Weight decay touches kernels only (never biases or LayerNorm parameters):
- `adamw`: decoupled, optax convention: each step subtracts
  `learning_rate(step) * weight_decay * param`. So the paper's "wd 0.1 at lr
  1e-3" equals a decoupled decay of 1e-4 at peak learning rate.
- `sgd`, `adam`: classic coupled L2, `weight_decay * param` added to the
  gradient after clipping (as PyTorch's `weight_decay` argument).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adam", "adamw")
DECAY_TYPES = ("cosine", "linear", "constant")


def make_schedule(
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay_type: str = "cosine",
    linear_end: float = 1e-5,
) -> optax.Schedule:
    """vit_jax's schedule: linear warmup from 0, then cosine/linear decay or constant.

    The decay runs from the end of the warmup to `total_steps` (cosine to 0,
    linear to `linear_end`); the warmup factor `min(1, step / warmup_steps)`
    multiplies it, so step 0 has learning rate 0 when there is a warmup.
    """
    if decay_type not in DECAY_TYPES:
        raise ValueError(f"Unknown decay_type {decay_type!r}; expected one of {DECAY_TYPES}.")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}."
        )

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        if decay_type == "cosine":
            lr = base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif decay_type == "linear":
            lr = linear_end + (base_lr - linear_end) * (1.0 - progress)
        else:
            lr = jnp.asarray(base_lr, jnp.float32)
        if warmup_steps:
            lr = lr * jnp.minimum(1.0, step / warmup_steps)
        return lr

    return schedule


def kernel_mask(params: Any) -> Any:
    """True for `kernel` leaves (weight decay applies to them only)."""
    def is_kernel(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def _dtype_or_none(name: str | None):
    return None if name in (None, "", "float32") else jnp.dtype(name)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Builds `(tx, schedule)` from a config; see the module docstring for the keys.

    Required keys: `base_lr`, `total_steps`. Optional (default): `optim` ('sgd'),
    `momentum` (0.9; 0 = plain SGD), `mu_dtype` (None), `b1` (0.9), `b2` (0.999),
    `weight_decay` (0), `warmup_steps` (0), `decay_type` ('cosine'),
    `linear_end` (1e-5), `grad_norm_clip` (None; None or 0 = off).
    """
    name = config.get("optim", "sgd")
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown config.optim {name!r}; expected one of {OPTIMIZERS}.")
    schedule = make_schedule(
        base_lr=config.base_lr,
        total_steps=config.total_steps,
        warmup_steps=config.get("warmup_steps", 0),
        decay_type=config.get("decay_type", "cosine"),
        linear_end=config.get("linear_end", 1e-5),
    )
    mu_dtype = _dtype_or_none(config.get("mu_dtype", None))
    weight_decay = config.get("weight_decay", 0.0) or 0.0
    clip = config.get("grad_norm_clip", None)

    betas = dict(b1=config.get("b1", 0.9), b2=config.get("b2", 0.999))
    chain = []
    if clip:
        chain.append(optax.clip_by_global_norm(clip))
    if name == "adamw":
        chain.append(optax.adamw(
            schedule, **betas, mu_dtype=mu_dtype, weight_decay=weight_decay, mask=kernel_mask,
        ))
    else:
        if weight_decay:
            chain.append(optax.add_decayed_weights(weight_decay, mask=kernel_mask))
        if name == "adam":
            chain.append(optax.adam(schedule, **betas, mu_dtype=mu_dtype))
        else:
            momentum = config.get("momentum", 0.9) or None
            chain.append(optax.sgd(schedule, momentum=momentum, accumulator_dtype=mu_dtype))
    return optax.chain(*chain), schedule
