"""Optimizer chains and schedules built from config (mixer_jax.optim)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mixer_jax import optim


def config(**kw):
    base = dict(base_lr=0.1, total_steps=110, warmup_steps=0, decay_type="constant")
    base.update(kw)
    return ml_collections.ConfigDict(base)


def params():
    return {"dense": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 2.0)}}


def grads(value=1.0):
    return jax.tree.map(lambda p: jnp.full_like(p, value), params())


def step(tx, state, g, p):
    updates, state = tx.update(g, state, p)
    return optax.apply_updates(p, updates), state


@pytest.mark.parametrize("decay_type,expected", [
    # warmup 10 of 110 steps, base 0.1 (vit_jax's formula)
    ("cosine", {0: 0.0, 5: 0.05, 10: 0.1, 60: 0.05, 110: 0.0, 200: 0.0}),
    ("linear", {0: 0.0, 5: 0.05, 10: 0.1, 60: (0.1 + 1e-5) / 2, 110: 1e-5}),
    ("constant", {0: 0.0, 5: 0.05, 10: 0.1, 60: 0.1, 110: 0.1}),
])
def test_schedule_values(decay_type, expected):
    schedule = optim.make_schedule(
        base_lr=0.1, total_steps=110, warmup_steps=10, decay_type=decay_type
    )
    for s, lr in expected.items():
        np.testing.assert_allclose(float(schedule(s)), lr, rtol=1e-5, atol=1e-9, err_msg=str(s))


def test_schedule_without_warmup_starts_at_base_lr():
    schedule = optim.make_schedule(base_lr=0.03, total_steps=100, decay_type="cosine")
    np.testing.assert_allclose(float(schedule(0)), 0.03, rtol=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(optim="lamb"), "optim"),
    (dict(decay_type="exp"), "decay_type"),
    (dict(warmup_steps=110), "warmup_steps"),
    (dict(total_steps=0), "total_steps"),
])
def test_bad_config_is_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        optim.make_optimizer(config(**kw))


def test_sgd_momentum_two_steps():
    tx, _ = optim.make_optimizer(config(optim="sgd", momentum=0.9))
    p = params()
    state = tx.init(p)
    p, state = step(tx, state, grads(1.0), p)
    p, state = step(tx, state, grads(2.0), p)
    # trace: 1, then 2 + 0.9 * 1 = 2.9; params: 2 - 0.1 * (1 + 2.9)
    np.testing.assert_allclose(p["dense"]["kernel"], 2.0 - 0.1 * 3.9, rtol=1e-6)
    np.testing.assert_allclose(p["dense"]["bias"], 2.0 - 0.1 * 3.9, rtol=1e-6)


def test_bfloat16_momentum_keeps_float32_params():
    tx, _ = optim.make_optimizer(config(optim="sgd", mu_dtype="bfloat16"))
    p = params()
    state = tx.init(p)
    p, state = step(tx, state, grads(1.0), p)
    traces = [leaf for leaf in jax.tree.leaves(state) if leaf.ndim > 0]
    assert traces and all(t.dtype == jnp.bfloat16 for t in traces)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(p))
    np.testing.assert_allclose(p["dense"]["kernel"], 1.9, rtol=1e-3)  # bf16 update


def test_gradient_clipping_by_global_norm():
    tx, _ = optim.make_optimizer(config(momentum=0, grad_norm_clip=1.0))
    p = params()
    p, _ = step(tx, tx.init(p), grads(2.0), p)  # global norm 2 * sqrt(9) = 6
    np.testing.assert_allclose(p["dense"]["kernel"], 2.0 - 0.1 * 2.0 / 6.0, rtol=1e-6)


def test_clipping_off_when_zero():
    tx, _ = optim.make_optimizer(config(momentum=0, grad_norm_clip=0))
    p = params()
    p, _ = step(tx, tx.init(p), grads(2.0), p)
    np.testing.assert_allclose(p["dense"]["kernel"], 2.0 - 0.1 * 2.0, rtol=1e-6)


def test_adamw_decays_kernels_only_decoupled():
    tx, schedule = optim.make_optimizer(config(optim="adamw", weight_decay=0.5))
    p = params()
    p, _ = step(tx, tx.init(p), grads(0.0), p)
    # zero gradient: Adam's step is 0, decay subtracts lr * wd * param from kernels
    np.testing.assert_allclose(p["dense"]["kernel"], 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(p["dense"]["bias"], 2.0, rtol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_coupled_weight_decay_on_kernels_only(name):
    tx, _ = optim.make_optimizer(config(optim=name, momentum=0, weight_decay=0.5))
    p = params()
    p, _ = step(tx, tx.init(p), grads(0.0), p)
    if name == "sgd":  # gradient += wd * param = 1.0
        np.testing.assert_allclose(p["dense"]["kernel"], 2.0 - 0.1 * 1.0, rtol=1e-6)
    else:  # Adam's first step is lr * sign(gradient)
        np.testing.assert_allclose(p["dense"]["kernel"], 2.0 - 0.1, rtol=1e-5)
    np.testing.assert_allclose(p["dense"]["bias"], 2.0, rtol=1e-6)


def test_adam_uses_b1_b2():
    tx, _ = optim.make_optimizer(config(optim="adam", b1=0.5, b2=0.5))
    p = params()
    state = tx.init(p)
    p, state = step(tx, state, grads(1.0), p)  # first step: lr * 1
    p, state = step(tx, state, grads(3.0), p)
    # m = (0.5 * 0.5 + 0.5 * 3) / (1 - 0.5**2) = 7/3; v = (0.5 * 0.5 + 0.5 * 9) / 0.75 = 19/3
    expected = 2.0 - 0.1 - 0.1 * (7 / 3) / np.sqrt(19 / 3)
    np.testing.assert_allclose(p["dense"]["bias"], expected, rtol=1e-5)


def test_schedule_drives_the_optimizer():
    tx, schedule = optim.make_optimizer(
        config(momentum=0, warmup_steps=10, decay_type="cosine")
    )
    p = params()
    state = tx.init(p)
    p, state = step(tx, state, grads(1.0), p)  # lr(0) = 0 under warmup
    np.testing.assert_allclose(p["dense"]["kernel"], 2.0)
    p, state = step(tx, state, grads(1.0), p)
    np.testing.assert_allclose(p["dense"]["kernel"], 2.0 - float(schedule(1)), rtol=1e-6)
