"""A tiny model, config and synthetic batches shared by the training-step tests
(and the distributed worker, which imports this without pytest)."""
from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from mixer_jax import models, optim, steps

CROP = 16
NUM_CLASSES = 10
BATCH = 16


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """Fine-tuning recipe (SGD momentum, clipping), constant lr so step 0 moves."""
    config = ml_collections.ConfigDict(dict(
        optim="sgd", momentum=0.9, base_lr=0.1, total_steps=100, warmup_steps=0,
        decay_type="constant", grad_norm_clip=1.0, batch=BATCH, accum_steps=1,
        parallelism="data", mesh_model=1, fsdp_min_size=1024, pp=dict(crop=CROP),
    ))
    config.update(overrides)
    return config


def tiny_model(**overrides) -> models.MlpMixer:
    return models.create_model("Mixer-Ti_4", num_classes=NUM_CLASSES, **overrides)


def synthetic_batch(seed: int, size: int = BATCH) -> dict[str, np.ndarray]:
    """Random images in [-1, 1] and one-hot labels."""
    rs = np.random.RandomState(seed)
    return {
        "image": rs.uniform(-1, 1, (size, CROP, CROP, 3)).astype(np.float32),
        "label": np.eye(NUM_CLASSES, dtype=np.float32)[rs.randint(0, NUM_CLASSES, size)],
    }


def with_random_head(state, seed: int = 0):
    """The head is zero-initialised, which makes every other gradient zero at
    step 0; a random head lets one step exercise the whole network."""
    rs = np.random.RandomState(seed)
    head = dict(state.params["head"])
    head["kernel"] = rs.normal(0, 0.5, head["kernel"].shape).astype(np.float32)
    return state.replace(params={**state.params, "head": head})


@functools.cache
def reference_model_and_tx():
    """The model and optimizer (fine-tuning recipe) of the reference runs."""
    return tiny_model(), optim.make_optimizer(tiny_config())[0]


def init_fn(model, tx):
    """`steps.init_state` for the tiny images, as a function of the key only."""
    return functools.partial(steps.init_state, model, tx, image_shape=(CROP, CROP, 3))


@functools.cache
def reference_setup():
    """(model, tx, host state with a random head): the single-device reference."""
    model, tx = reference_model_and_tx()
    state = jax.jit(init_fn(model, tx))(jax.random.PRNGKey(0))
    return model, tx, jax.device_get(with_random_head(state))


@functools.cache
def jitted_train_step(model, tx, accum_steps: int = 1):
    """`steps.train_step` jitted on one device (cached: compiled once per session)."""
    return jax.jit(functools.partial(
        steps.train_step, model=model, tx=tx, accum_steps=accum_steps))


def reference_run(batches, accum_steps: int = 1):
    """Single-device training over `batches` from `reference_setup()`: (state, losses)."""
    model, tx, state = reference_setup()
    train = jitted_train_step(model, tx, accum_steps)
    losses = []
    for batch in batches:
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses
