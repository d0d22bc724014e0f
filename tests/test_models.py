"""Tests for mixer_jax.models: published variants, layout, numerics, transforms."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from mixer_jax import models

# Paper / published-checkpoint parameter counts at 224 with a 1000-class head.
PUBLISHED_PARAM_COUNTS = {
    "Mixer-S_32": 19_104_624,
    "Mixer-S_16": 18_528_264,
    "Mixer-B_32": 60_293_428,
    "Mixer-B_16": 59_880_472,
    "Mixer-L_32": 206_939_264,
    "Mixer-L_16": 208_196_168,
    "Mixer-H_14": 432_350_952,
}


def abstract_params(model, size=224):
    return models.param_shapes(model, (size, size, 3))


def random_params(model, size, seed=0, scale=0.05):
    """Initialised params perturbed everywhere (the zero-initialised head included)."""
    params = jax.jit(models.init_params, static_argnums=(0, 2))(model, jax.random.key(seed), (size, size, 3))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + scale * rng.standard_normal(x.shape, np.float32), params)


def apply_fn(model, **kwargs):
    """Jitted `model.apply` (eager Flax dispatch is slow)."""
    return jax.jit(lambda params, images, **kw: model.apply(
        {"params": params}, images, **kwargs, **kw))


@pytest.mark.parametrize("variant", sorted(PUBLISHED_PARAM_COUNTS))
def test_param_count_matches_paper(variant):
    params = abstract_params(models.create_model(variant))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(params)) == PUBLISHED_PARAM_COUNTS[variant]


def published_b16_keys():
    """The Mixer-B/16 key list of the published .npz files (reference notes, section 2)."""
    keys = {
        "stem/kernel": (16, 16, 3, 768), "stem/bias": (768,),
        "pre_head_layer_norm/scale": (768,), "pre_head_layer_norm/bias": (768,),
        "head/kernel": (768, 1000), "head/bias": (1000,),
    }
    for i in range(12):
        b = f"MixerBlock_{i}"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            keys[f"{b}/{ln}/scale"] = keys[f"{b}/{ln}/bias"] = (768,)
        for mlp, width, hidden in (("token_mixing", 196, 384), ("channel_mixing", 768, 3072)):
            keys[f"{b}/{mlp}/Dense_0/kernel"] = (width, hidden)
            keys[f"{b}/{mlp}/Dense_0/bias"] = (hidden,)
            keys[f"{b}/{mlp}/Dense_1/kernel"] = (hidden, width)
            keys[f"{b}/{mlp}/Dense_1/bias"] = (width,)
    return keys


def test_b16_tree_is_the_published_layout():
    params = abstract_params(models.create_model("Mixer-B_16"))
    got = {"/".join(k): v.shape for k, v in flatten_dict(params).items()}
    expected = published_b16_keys()
    assert len(expected) == 150
    assert got == expected


@pytest.mark.parametrize("variant", sorted(models.VARIANTS))
def test_every_variant_builds_any_size_and_features(variant):
    """timm-style sweep: any patch-divisible size, any class count, pooled features.

    Two blocks of each variant's widths (tracing is per block; the full depths' counts are
    checked above)."""
    patch = models.VARIANTS[variant]["patch_size"]
    size = 2 * patch
    hidden = models.VARIANTS[variant]["hidden_dim"]
    x = jnp.zeros((2, size, size, 3))
    logits = jax.eval_shape(
        lambda: models.create_model(variant, num_classes=7, num_blocks=2).init_with_output(
            jax.random.key(0), x)[0])
    assert logits.shape == (2, 7)
    model = models.create_model(variant, num_classes=None, num_blocks=2)
    params = abstract_params(model, size)
    assert "head" not in params
    assert params["MixerBlock_0"]["token_mixing"]["Dense_0"]["kernel"].shape[0] == 4
    out = jax.eval_shape(lambda p: model.apply({"params": p}, x), params)
    assert out.shape == (2, hidden)


def test_bad_image_size_and_variant_errors():
    model = models.create_model("Mixer-Ti_4", num_classes=3)
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        model.init(jax.random.key(0), jnp.zeros((1, 18, 16, 3)))
    with pytest.raises(ValueError, match="Unknown model 'Mixer-X_1'.*list_models"):
        models.create_model("Mixer-X_1")
    with pytest.raises(TypeError, match="drop_path"):
        models.create_model("Mixer-B_16", drop_path=0.1)
    assert models.create_model("Mixer-B/16") == models.create_model("Mixer-B_16")


# --- Independent numpy reference forward pass ------------------------------------------

def np_layer_norm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def np_mlp(x, p):
    h = np_gelu_tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def np_mixer(params, images, patch):
    """Mixer forward from the paper's equations, in float64 numpy."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    n, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    patches = images.reshape(n, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, gh * gw, patch * patch * c)
    kernel = params["stem"]["kernel"].reshape(-1, params["stem"]["kernel"].shape[-1])
    x = patches @ kernel + params["stem"]["bias"]
    for i in range(len([k for k in params if k.startswith("MixerBlock_")])):
        b = params[f"MixerBlock_{i}"]
        y = np_layer_norm(x, b["LayerNorm_0"]).transpose(0, 2, 1)
        x = x + np_mlp(y, b["token_mixing"]).transpose(0, 2, 1)
        x = x + np_mlp(np_layer_norm(x, b["LayerNorm_1"]), b["channel_mixing"])
    x = np_layer_norm(x, params["pre_head_layer_norm"]).mean(1)
    return x @ params["head"]["kernel"] + params["head"]["bias"]


@pytest.mark.parametrize("variant,size", [
    ("Mixer-Ti_4", 16), pytest.param("Mixer-S_32", 64, marks=pytest.mark.slow)])
def test_logits_match_numpy_reference(variant, size):
    model = models.create_model(variant, num_classes=5)
    params = random_params(model, size)
    images = jax.random.uniform(jax.random.key(9), (3, size, size, 3), minval=-1, maxval=1)
    got = np.asarray(apply_fn(model)(params, images), np.float64)
    want = np_mixer(params, np.asarray(images, np.float64), models.VARIANTS[variant]["patch_size"])
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-5, rel


# --- Scan / remat / intermediates / regularisation -------------------------------------

TINY = dict(num_classes=6)


def test_scan_and_remat_match_unrolled_logits_and_grads():
    model = models.create_model("Mixer-Ti_4", **TINY)
    params = random_params(model, 16)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))

    def loss(p, m):
        return jnp.sum(m.apply({"params": p}, images) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref_loss, ref_grads = value_and_grad(params, model)
    for kw in (dict(scan=True), dict(remat=True), dict(scan=True, remat=True)):
        variant = model.clone(**kw)
        p = models.stack_blocks(params) if kw.get("scan") else params
        val, grads = value_and_grad(p, variant)
        grads = models.unstack_blocks(grads)
        np.testing.assert_allclose(val, ref_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     grads, ref_grads)


def test_stack_unstack_round_trip_and_scanned_layout():
    model = models.create_model("Mixer-Ti_4", **TINY)
    params = random_params(model, 16)
    stacked = models.stack_blocks(params)
    scanned_shapes = abstract_params(model.clone(scan=True), 16)
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(lambda s: s.shape, scanned_shapes)
    assert stacked["MixerBlocks"]["block"]["LayerNorm_0"]["scale"].shape == (2, 64)
    back = models.unstack_blocks(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)


def tiny(scan):
    """Mixer-Ti_4 (scanned or not) and random 16x16 params in its layout."""
    model = models.create_model("Mixer-Ti_4", scan=scan, **TINY)
    params = random_params(model.clone(scan=False), 16)
    return model, models.stack_blocks(params) if scan else params


@pytest.mark.parametrize("scan", [False, True])
def test_intermediates_come_from_the_same_pass(scan):
    model, params = tiny(scan)
    images = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    logits, feats = apply_fn(model, return_intermediates=True)(params, images)
    assert set(feats) == {"stem", "block_0", "block_1", "pre_logits"}
    assert feats["stem"].shape == feats["block_1"].shape == (2, 16, 64)
    np.testing.assert_allclose(logits, apply_fn(model)(params, images), rtol=1e-6)
    head = params["head"]
    np.testing.assert_allclose(feats["pre_logits"] @ head["kernel"] + head["bias"], logits,
                               rtol=1e-5, atol=1e-6)
    # The pooled features of a headless model are the pre-logits.
    headless = {k: v for k, v in params.items() if k != "head"}
    pooled = apply_fn(model.clone(num_classes=None))(headless, images)
    np.testing.assert_allclose(pooled, feats["pre_logits"], rtol=1e-6)
    # Tokens after the last block feed the pre-head norm + mean.
    unrolled = models.unstack_blocks(params)
    ln = unrolled["pre_head_layer_norm"]
    pooled_ref = np_layer_norm(np.asarray(feats["block_1"], np.float64), ln).mean(1)
    np.testing.assert_allclose(feats["pre_logits"], pooled_ref, rtol=1e-4, atol=1e-5)


def test_stochastic_depth_ramp_and_scaling():
    model = models.create_model("Mixer-B_16", stoch_depth=0.1)
    np.testing.assert_allclose(model.drop_rates(), np.linspace(0, 0.1, 12), rtol=1e-6)
    assert model.drop_rates()[0] == 0.0
    x = jnp.ones((4000, 3))
    y = models.drop_path(x, 0.25, jax.random.key(0))
    kept = np.asarray(y[:, 0]) != 0
    assert set(np.unique(np.asarray(y))) == {0.0, np.float32(1 / 0.75)}
    assert abs(kept.mean() - 0.75) < 0.03
    assert np.all(np.asarray(y) == np.asarray(y[:, :1]))  # whole examples dropped


@pytest.mark.parametrize("scan", [False, True])
def test_regularisation_only_in_training(scan):
    base, params = tiny(scan)
    images = jax.random.normal(jax.random.key(3), (4, 16, 16, 3))
    plain = apply_fn(base)(params, images)
    # No regularisation: training and eval outputs agree.
    np.testing.assert_allclose(apply_fn(base, train=True)(params, images), plain, rtol=1e-6)
    noisy = base.clone(dropout=0.3, stoch_depth=0.5)
    np.testing.assert_allclose(apply_fn(noisy)(params, images), plain, rtol=1e-6)
    train_apply = apply_fn(noisy, train=True)
    a = train_apply(params, images, rngs={"dropout": jax.random.key(0)})
    b = train_apply(params, images, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, plain, atol=1e-4)
    assert not np.allclose(a, b, atol=1e-4)


def test_bfloat16_compute_with_float32_params():
    model = models.create_model("Mixer-Ti_4", dtype=jnp.bfloat16, **TINY)
    params = random_params(model, 16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    images = jax.random.normal(jax.random.key(4), (2, 16, 16, 3))
    out = apply_fn(model)(params, images)
    assert out.dtype == jnp.bfloat16
    ref = apply_fn(model.clone(dtype=jnp.float32))(params, images)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.05 * float(jnp.abs(ref).max()))


def test_registry_lists_and_builds_by_name():
    assert "Mixer-B_16" in models.list_models()
    assert models.list_models("Mixer-S_*") == ["Mixer-S_16", "Mixer-S_32", "Mixer-S_8"]
    assert models.get_family("Mixer-B/16").name == "mixer"
    assert models.create_model("Mixer-Ti_4", num_classes=0).num_classes is None
    with pytest.raises(ValueError, match="num_classes must be positive"):
        models.create_model("Mixer-Ti_4", num_classes=-3)


@pytest.mark.parametrize("scan", [False, True])
def test_parameters_declare_logical_axes(scan):
    model = models.create_model("Mixer-Ti_4", num_classes=5, scan=scan)
    flat = flatten_dict(models.param_axes(model, (16, 16, 3)), sep="/")
    shapes = flatten_dict(models.param_shapes(model, (16, 16, 3)), sep="/")
    assert {k: len(v) for k, v in flat.items()} == {k: len(v.shape) for k, v in shapes.items()}
    block = "MixerBlocks/block/" if scan else "MixerBlock_0/"
    lead = ("layers",) if scan else ()
    assert flat[block + "token_mixing/Dense_0/kernel"] == lead + ("tokens", "mlp")
    assert flat[block + "channel_mixing/Dense_1/kernel"] == lead + ("mlp", "embed")
    assert flat["head/kernel"] == ("embed", "classes")
    assert flat["stem/kernel"] == ("kernel", "kernel", "channels", "embed")


@pytest.mark.parametrize("name, ramp", [("Mixer-Ti_4", True), ("mixer_s32_224", False)])
def test_forward_pass_uses_the_drop_path_rule(name, ramp):
    """At stoch_depth=1 a block whose rate is 1 always drops its branches: Google's names
    ramp 0 -> 1 (block 0 kept, block 1 dropped), timm's use 1 everywhere."""
    model = models.create_model(name, num_classes=3, patch_size=4, num_blocks=2, hidden_dim=8,
                                tokens_mlp_dim=4, channels_mlp_dim=8, stoch_depth=1.0)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    params = models.init_params(model, jax.random.key(0), (16, 16, 3))
    _, feats = model.apply({"params": params}, x, train=True, return_intermediates=True,
                           rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(feats["block_1"], feats["block_0"])
    assert (not np.array_equal(feats["block_0"], feats["stem"])) == ramp
