"""The pure training and evaluation steps, shared by every parallel strategy.

Nothing here jits, pmaps or touches devices: `parallel.py` wraps these
functions (pmap with an axis name, or jit over a device mesh).
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mixer_jax import mix
from mixer_jax.models import registry


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: step, params, optimizer state, RNG.

    `constants` are the model's non-trainable variable collections (`{}` for most
    families; RandFormer: `{"frozen": ...}`, its random mixing matrices): made by init,
    applied with the parameters, never seen by the optimizer nor updated.
    `rng` is a raw uint32 PRNG key (`jax.random.PRNGKey` layout), so it saves
    and shards like any other array.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    constants: Any = flax.struct.field(default_factory=dict)

    @property
    def variables(self) -> dict:
        """What `model.apply` takes: parameters and constants."""
        return registry.as_variables(self.params, self.constants)


def raw_key(rng: jax.Array) -> jax.Array:
    """A raw uint32 key from either a typed key (`jax.random.key`) or a raw one."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(rng)
    return rng


def init_state(
    model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, image_shape
) -> TrainState:
    """Fresh parameters and constants (from `rng`), optimizer state, and the dropout RNG."""
    params_rng, state_rng = jax.random.split(raw_key(rng))
    images = jnp.zeros((1, *image_shape), jnp.float32)
    params, constants = registry.split_variables(
        nn.meta.unbox(model.init({"params": params_rng}, images, train=False)))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=state_rng,
        constants=constants,
    )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy with soft (one-hot or mixup) labels."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.sum(labels * log_probs, axis=-1)


def split_microbatches(batch: dict, accum_steps: int) -> dict:
    """[B, ...] -> [accum_steps, B // accum_steps, ...].

    Micro-batch i takes examples i, i + accum_steps, i + 2 * accum_steps, ...
    so that a batch sharded contiguously over devices gives every device an
    equal, local part of every micro-batch (no data moves between devices).
    """
    def split(x):
        size = x.shape[0]
        if size % accum_steps:
            raise ValueError(
                f"Batch of {size} examples does not split into {accum_steps} equal "
                "micro-batches."
            )
        x = x.reshape(size // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def forward(model: nn.Module, variables: Any, images: jax.Array, *,
            microbatch: int | None = None) -> jax.Array:
    """Inference logits for `images`, `microbatch` images at a time when given.

    `variables`: what `model.apply` takes (`registry.as_variables(params, constants)`).

    The micro-batches (`split_microbatches`' interleaved order; logits come back
    in input order) are independent computations in one program, which XLA:CPU
    runs side by side on its cores, each with cache-sized matmuls: faster than
    one large batch on CPUs. Compile time grows with their number. On
    accelerators leave it None.
    """
    batch = images.shape[0]
    if microbatch is None or microbatch >= batch:
        return model.apply(variables, images)
    if microbatch < 1 or batch % microbatch:
        raise ValueError(f"A batch of {batch} images does not split into micro-batches "
                         f"of {microbatch}.")
    chunks = split_microbatches(images, batch // microbatch)
    logits = jnp.stack([model.apply(variables, chunk) for chunk in chunks])
    return jnp.swapaxes(logits, 0, 1).reshape(batch, *logits.shape[2:])


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    accum_steps: int = 1,
    axis_name: str | None = None,
    mixer: mix.Mixer | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer step on `batch` {'image', 'label'}; returns (new state, metrics).

    The gradient is the mean over the whole batch; with `accum_steps > 1` it is
    accumulated (in float32) over equal micro-batches by `lax.scan`, which gives
    the same update as one full-batch step with less activation memory. Under
    pmap, `axis_name` names the device axis to average gradients and metrics
    over. Metrics: 'loss' (mean cross-entropy) and 'grad_norm' (global norm
    before clipping). `mixer` (`mix.make_mixer`, made per device by the strategy)
    mixes each micro-batch within itself, keyed by the micro-step's RNG.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        # Each pmap device holds different examples: give them different masks.
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def loss_fn(params, micro, micro_rng):
        if mixer is not None:  # inputs only: no gradient flows through mixing
            micro = mixer(micro, mix.step_key(micro_rng))
        logits = model.apply(registry.as_variables(params, state.constants), micro["image"],
                             train=True, rngs={"dropout": micro_rng})
        return jnp.mean(cross_entropy(logits, micro["label"]))

    grad_fn = jax.value_and_grad(loss_fn)
    if accum_steps == 1:
        loss, grads = grad_fn(state.params, batch, rng)
    else:
        def accumulate(carry, xs):
            index, micro = xs
            loss, grads = grad_fn(state.params, micro, jax.random.fold_in(rng, index))
            loss_sum, grad_sum = carry
            grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads)
            return (loss_sum + loss, grad_sum), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        micro_batches = split_microbatches(batch, accum_steps)
        (loss, grads), _ = jax.lax.scan(
            accumulate, (jnp.zeros((), jnp.float32), zeros),
            (jnp.arange(accum_steps), micro_batches),
        )
        loss = loss / accum_steps
        grads = jax.tree.map(
            lambda g, p: (g / accum_steps).astype(p.dtype), grads, state.params
        )

    if axis_name is not None:
        loss, grads = jax.lax.pmean((loss, grads), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
    )
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def eval_step(
    variables: Any, batch: dict, *, model: nn.Module, axis_name: str | None = None
) -> dict:
    """Sums over the batch of 'loss', 'top1', 'top5' and 'count', weighted by 'mask'.

    `variables`: parameters and constants (`TrainState.variables`).

    Padding examples (mask 0) count nowhere; divide by 'count' for means. The
    true class is the argmax of the one-hot 'label'. Under pmap, `axis_name`
    sums over devices too.
    """
    logits = model.apply(variables, batch["image"], train=False)
    labels = batch["label"]
    mask = batch.get("mask")
    if mask is None:
        mask = jnp.ones(labels.shape[:1], jnp.float32)
    target = jnp.argmax(labels, axis=-1)
    _, top_k = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    sums = {
        "loss": jnp.sum(cross_entropy(logits, labels) * mask),
        "top1": jnp.sum((top_k[:, 0] == target) * mask),
        "top5": jnp.sum(jnp.any(top_k == target[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }
    if axis_name is not None:
        sums = jax.lax.psum(sums, axis_name)
    return sums
