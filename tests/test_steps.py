"""The pure train/eval steps (mixer_jax.steps), on one device."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import steps
from tiny_training import (
    CROP, NUM_CLASSES, jitted_train_step, reference_setup, synthetic_batch, tiny_model,
)

IMAGE_SHAPE = (CROP, CROP, 3)


def assert_trees_close(actual, expected, **tol):
    jax.tree.map(functools.partial(np.testing.assert_allclose, **tol), actual, expected)


@functools.cache
def jitted_logits(model):
    return jax.jit(lambda params, images: model.apply({"params": params}, images))


def test_init_state():
    model, tx, _ = reference_setup()
    init = functools.partial(steps.init_state, model, tx, image_shape=IMAGE_SHAPE)
    state = jax.eval_shape(init, jax.random.PRNGKey(1))
    assert state.step.shape == () and state.step.dtype == jnp.int32
    assert state.rng.dtype == jnp.uint32 and state.rng.shape == (2,)
    assert state.params["stem"]["kernel"].shape == (4, 4, 3, 64)
    assert state.params["head"]["kernel"].shape == (64, NUM_CLASSES)
    # momentum buffers mirror the params
    assert jax.tree.structure(state.opt_state[1][0].trace) == jax.tree.structure(state.params)
    # a typed key is accepted and stored as raw key data
    typed = jax.eval_shape(init, jax.random.key(1))
    assert typed.rng.dtype == jnp.uint32 and typed.rng.shape == (2,)


def test_cross_entropy_with_soft_labels():
    logits = jnp.array([[0.0, np.log(3.0)], [2.0, 2.0]])
    labels = jnp.array([[0.5, 0.5], [1.0, 0.0]])
    # probs: [1/4, 3/4] and [1/2, 1/2]
    expected = [-(0.5 * np.log(0.25) + 0.5 * np.log(0.75)), np.log(2.0)]
    np.testing.assert_allclose(steps.cross_entropy(logits, labels), expected, rtol=1e-6)


def test_split_microbatches_strided():
    batch = {"x": jnp.arange(8), "y": jnp.arange(8) * 10}
    micro = steps.split_microbatches(batch, 4)
    np.testing.assert_array_equal(micro["x"], [[0, 4], [1, 5], [2, 6], [3, 7]])
    np.testing.assert_array_equal(micro["y"][1], [10, 50])
    with pytest.raises(ValueError, match="Batch of 8 examples does not split into 3 equal"):
        steps.split_microbatches(batch, 3)


@pytest.mark.parametrize("microbatch", [pytest.param(1, marks=pytest.mark.slow), 4, 16, 64])
def test_forward_in_microbatches_keeps_input_order(microbatch):
    model, _, state = reference_setup()
    images = synthetic_batch(5)["image"]
    whole = np.asarray(jitted_logits(model)(state.params, images))
    assert np.ptp(whole[:, 0]) > 0.1  # examples differ, so a reordering would show
    pieces = jax.jit(functools.partial(steps.forward, model, microbatch=microbatch))
    np.testing.assert_allclose(pieces(state.variables, images), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("microbatch", [0, 3, -2])
def test_forward_rejects_microbatches_that_do_not_divide(microbatch):
    model, _, state = reference_setup()
    with pytest.raises(ValueError, match=f"batch of 16 images does not split into "
                                         f"micro-batches of {microbatch}"):
        steps.forward(model, state.variables, synthetic_batch(5)["image"], microbatch=microbatch)


def test_train_step_loss_and_learning():
    model, tx, state = reference_setup()
    batch = synthetic_batch(0)
    logits = jitted_logits(model)(state.params, batch["image"])
    expected_loss = np.mean(steps.cross_entropy(logits, batch["label"]))
    train = jitted_train_step(model, tx)
    new_state, metrics = train(state, batch)
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
    # first SGD-momentum step: params move by lr (0.1) * gradient clipped to norm 1
    moved = jax.tree.map(lambda a, b: np.sum((a - b) ** 2), new_state.params, state.params)
    np.testing.assert_allclose(np.sqrt(sum(jax.tree.leaves(moved))) / 0.1,
                               min(float(metrics["grad_norm"]), 1.0), rtol=1e-4)
    assert int(new_state.step) == 1
    np.testing.assert_array_equal(new_state.rng, state.rng)
    losses = [float(metrics["loss"])]
    for _ in range(4):
        new_state, metrics = train(new_state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses  # memorises a fixed batch


def test_gradient_accumulation_equals_full_batch():
    model, tx, state = reference_setup()
    full = jitted_train_step(model, tx)
    accum = jitted_train_step(model, tx, 4)
    s_full, s_accum = state, state
    for seed in (1, 2):  # two steps: momentum state must agree too
        batch = synthetic_batch(seed)
        s_full, m_full = full(s_full, batch)
        s_accum, m_accum = accum(s_accum, batch)
        np.testing.assert_allclose(m_accum["loss"], m_full["loss"], rtol=1e-5)
        np.testing.assert_allclose(m_accum["grad_norm"], m_full["grad_norm"], rtol=1e-5)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), s_full.params, state.params)
    # every kernel took part (token-mixing output biases get no gradient: the
    # next LayerNorm removes any per-token constant)
    assert min(v for k, v in jax.tree_util.tree_leaves_with_path(moved)
               if k[-1].key == "kernel") > 1e-4
    assert_trees_close(s_accum.params, s_full.params, rtol=1e-5, atol=1e-6)
    assert_trees_close(s_accum.opt_state, s_full.opt_state, rtol=1e-5, atol=1e-6)


def test_drop_path_rng_is_per_step_and_deterministic():
    _, tx, state = reference_setup()
    train = jitted_train_step(tiny_model(stoch_depth=0.5), tx)
    batch = synthetic_batch(3)
    _, m0 = train(state, batch)
    _, m0_again = train(state, batch)
    _, m1 = train(state.replace(step=state.step + 1), batch)
    assert float(m0["loss"]) == float(m0_again["loss"])
    assert float(m0["loss"]) != float(m1["loss"])


def test_eval_step_sums_with_mask():
    model, _, state = reference_setup()
    batch = synthetic_batch(4)
    mask = np.ones(len(batch["label"]), np.float32)
    mask[-5:] = 0
    logits = np.asarray(jitted_logits(model)(state.params, batch["image"]))
    target = batch["label"].argmax(-1)
    keep = mask == 1
    rank = (logits > logits[np.arange(len(target)), target][:, None]).sum(-1)
    expected = {
        "loss": float(np.sum(steps.cross_entropy(logits, batch["label"])[keep])),
        "top1": float(np.sum(rank[keep] == 0)),
        "top5": float(np.sum(rank[keep] < 5)),
        "count": 11.0,
    }
    assert 0 < expected["top1"] < expected["top5"] < expected["count"]  # a telling case
    evaluate = jax.jit(functools.partial(steps.eval_step, model=model))
    sums = jax.device_get(evaluate(state.variables, {**batch, "mask": mask}))
    for key, value in expected.items():
        np.testing.assert_allclose(sums[key], value, rtol=1e-5, err_msg=key)
    # padding examples do not count, whatever they contain
    garbage = batch["image"].copy()
    garbage[-5:] = 1.0
    again = jax.device_get(evaluate(state.variables, {**batch, "image": garbage, "mask": mask}))
    for key in expected:
        np.testing.assert_allclose(again[key], sums[key], rtol=1e-6, err_msg=key)
