"""ResMLP and gMLP (mixer_jax.models.resmlp / gmlp): counts, timm keys and logits, transforms."""
import math
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from mixer_jax import models
from mixer_jax.benchmark import flops as flops_lib
from mixer_jax.models import gmlp, resmlp

# `sum(p.numel() for p in timm.create_model(name).parameters())`, timm 1.0.31.
TIMM_PARAM_COUNTS = {
    "resmlp_12_224": 15_350_872,
    "resmlp_24_224": 30_020_680,
    "resmlp_36_224": 44_690_488,
    "resmlp_big_24_224": 129_138_280,
    "gmlp_ti16_224": 5_867_328,
    "gmlp_s16_224": 19_422_656,
    "gmlp_b16_224": 73_075_392,
}
NAMES = sorted(TIMM_PARAM_COUNTS)
# One small name per family runs in the quick subset; the others are marked slow.
QUICK = {"resmlp_12_224", "gmlp_ti16_224"}


def by_speed(names):
    return [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in names]


def flat(tree):
    return flatten_dict(tree, sep="/")


def test_every_name_is_registered():
    assert set(models.list_models("resmlp_*")) | set(models.list_models("gmlp_*")) == set(NAMES)
    assert models.get_family("resmlp_big_24_224").preprocessing == models.registry.IMAGENET
    assert models.get_family("gmlp_s16_224").preprocessing == models.registry.INCEPTION


@pytest.mark.parametrize("name", NAMES)
def test_param_count_equals_timm(name):
    shapes = models.param_shapes(models.create_model(name, scan=True))
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == TIMM_PARAM_COUNTS[name]


@pytest.mark.parametrize("name", by_speed(NAMES))
def test_to_timm_gives_timms_keys_and_shapes(name):
    """Against timm's real model, built on the meta device (no memory, no weights)."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in timm.create_model(name).state_dict().items()}
    family = models.get_family(name)
    # Zero-stride arrays of our shapes: the layout functions return views, nothing is allocated.
    ours = {k: np.broadcast_to(np.float32(0), v.shape)
            for k, v in flat(models.param_shapes(models.create_model(name))).items()}
    got = {k: v.shape for k, v in family.to_timm(ours).items()}
    assert got == expected
    assert family.architecture(ours) == {
        k: v for k, v in family.variants[name].items() if k != "layer_scale_init"}


# --- Logits parity with timm ----------------------------------------------------------------

def timm_model(name, **overrides):
    """timm's model `name` with its registered architecture, `overrides` applied on top.

    The entrypoints fix `num_blocks`, so `create_model(name, num_blocks=...)` is refused;
    the architecture arguments are read from the entrypoint itself instead.
    """
    mm = pytest.importorskip("timm.models.mlp_mixer")
    with mock.patch.object(mm, "_create_mixer", lambda variant, pretrained=False, **a: a):
        arguments = getattr(mm, name)()
    return mm.MlpMixer(**{**arguments, **overrides}).eval()


def perturbed(model, seed=0, scale=0.1):
    """Every parameter moved away from its init (layer scales, norms, gate, biases, head).

    Weights by noise of std 1/sqrt(fan in), so activations stay O(1) where the GELU form
    matters; vectors by `scale`; layer scales to ~1 so every branch weighs on the logits."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            std = (value[0].numel() ** -0.5) if value.ndim > 1 else scale
            value.add_(std * torch.randn(value.shape, generator=generator)
                       + key.endswith((".ls1", ".ls2")))
    return model


def assert_parity(name, blocks, size, num_classes=7, scan=False, shrink=()):
    """timm -> from_timm -> our logits == timm's; to_timm -> a fresh timm model == timm's.

    The timm tensors named in `shrink` are scaled by 1e-3 after the perturbation."""
    import torch
    family = models.get_family(name)
    source = perturbed(timm_model(name, num_blocks=blocks, img_size=size, num_classes=num_classes))
    with torch.no_grad():
        for key in shrink:
            source.state_dict()[key].mul_(1e-3)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = source(images).numpy()
    state = {k: v.numpy() for k, v in source.state_dict().items()}
    ours = family.from_timm(state)
    params = unflatten_dict(ours, sep="/")
    model = models.create_model(name, num_blocks=blocks, num_classes=num_classes, scan=scan)
    if scan:
        params = family.scanned(params)
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(images.permute(0, 2, 3, 1)))
    scale = np.abs(expected).max()
    assert np.abs(np.asarray(logits) - expected).max() / scale < 1e-4

    back = family.to_timm(ours)
    target = timm_model(name, num_blocks=blocks, img_size=size, num_classes=num_classes)
    target.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                            for k, v in back.items()}, strict=True)
    with torch.no_grad():
        assert np.abs(target(images).numpy() - expected).max() / scale < 1e-4


@pytest.mark.parametrize("name", by_speed(NAMES))
def test_logits_match_timm_both_ways(name):
    """The name's architecture with 2 blocks, on images of 2x2 patches (timm: img_size)."""
    pytest.importorskip("timm")
    assert_parity(name, blocks=2, size=2 * models.get_family(name).variants[name]["patch_size"])


def test_layer_norm_epsilons_match_timm():
    """gMLP's norms see variances near their epsilons (block and final 1e-6, the gating
    unit's 1e-5): with a tiny stem and fc1, swapping either epsilon fails the check."""
    pytest.importorskip("timm")
    assert_parity("gmlp_ti16_224", blocks=1, size=32, shrink=(
        "stem.proj.weight", "stem.proj.bias", "blocks.0.mlp_channels.fc1.weight",
        "blocks.0.mlp_channels.fc1.bias"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resmlp_12_224", "gmlp_ti16_224"])
def test_full_depth_full_size_logits_match_timm(name):
    """Every block at 224x224 (ours scanned: the per-block file stacked)."""
    pytest.importorskip("timm")
    variant = models.get_family(name).variants[name]
    assert_parity(name, blocks=variant["num_blocks"], size=224, num_classes=1000, scan=True)


def test_state_dict_round_trip_is_bitwise_and_errors_name_the_key():
    family = models.get_family("gmlp_ti16_224")
    model = models.create_model("gmlp_ti16_224", **tiny_fields())
    rng = np.random.default_rng(0)
    ours = {k: rng.standard_normal(v.shape).astype(np.float16)
            for k, v in flat(models.param_shapes(model, (16, 16, 3))).items()}
    state = family.to_timm(ours)
    assert state["blocks.1.mlp_channels.gate.proj.weight"].shape == (16, 16)
    back = family.from_timm(state)
    assert back.keys() == ours.keys()
    for k in ours:
        assert back[k].dtype == np.float16
        np.testing.assert_array_equal(back[k], ours[k])
    # A headless state dict (timm's num_classes=0) is complete without the head.
    headless = {k: v for k, v in state.items() if not k.startswith("head.")}
    assert "head/kernel" not in family.from_timm(headless)
    with pytest.raises(ValueError, match=r"Unknown key 'blocks\.0\.ls1'"):
        family.from_timm({**state, "blocks.0.ls1": np.ones(3)})
    with pytest.raises(ValueError, match=r"Missing key 'blocks\.1\.mlp_channels\.fc2\.bias'"):
        family.from_timm({k: v for k, v in state.items() if k != "blocks.1.mlp_channels.fc2.bias"})
    with pytest.raises(ValueError,
                       match=r"Unknown key 'blocks\.0\.[a-z_.]+' in a timm state dict for ResMLP"):
        models.get_family("resmlp").from_timm(state)
    with pytest.raises(ValueError, match="Not a ResMLP parameter tree"):
        models.get_family("resmlp").architecture(ours)


# --- The module contract on tiny models (16x16 images, patch 4: 16 tokens) --------------------

def tiny_fields(**overrides):
    return {**dict(patch_size=4, num_blocks=2, hidden_dim=16, mlp_dim=32, num_classes=5),
            **overrides}


FAMILIES = ["resmlp_12_224", "gmlp_ti16_224"]


def tiny(name, seed=0, **overrides):
    """A tiny model of `name`'s family and random params (per-block layout unless scanned).

    Random values of the right shapes (norm scales, layer scales and the gate bias around
    1, everything else around 0): cheaper than compiling an init, and far from init."""
    model = models.create_model(name, **tiny_fields(**overrides))
    rng = np.random.default_rng(seed)
    around_one = ("alpha", "scale", "ls1", "ls2", "gate/proj/bias")
    params = unflatten_dict({
        k: (k.endswith(around_one) + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in flat(models.param_shapes(model.clone(scan=False), (16, 16, 3))).items()},
        sep="/")
    if model.scan:
        params = models.get_family(name).scanned(params)
    return model, params


def images(n=2, size=16, seed=1):
    return np.random.default_rng(seed).standard_normal((n, size, size, 3), np.float32)


@pytest.mark.parametrize("name", FAMILIES)
def test_scanned_equals_unrolled_and_intermediates_come_from_the_same_pass(name):
    model, params = tiny(name)
    x = images()
    forward = jax.jit(lambda p, m: m.apply({"params": p}, x, return_intermediates=True),
                      static_argnums=1)
    logits, feats = forward(params, model)
    stacked = models.get_family(name).scanned(params)
    scanned = forward(stacked, model.clone(scan=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 scanned, (logits, feats))

    assert set(feats) == {"stem", "block_0", "block_1", "pre_logits"}
    assert feats["stem"].shape == feats["block_1"].shape == (2, 16, 16)
    assert feats["pre_logits"].shape == (2, 16)
    head = params["head"]
    np.testing.assert_allclose(feats["pre_logits"] @ head["kernel"] + head["bias"], logits,
                               rtol=1e-5, atol=1e-5)
    headless = {k: v for k, v in params.items() if k != "head"}
    pooled = jax.jit(model.clone(num_classes=None).apply)({"params": headless}, x)
    np.testing.assert_allclose(pooled, feats["pre_logits"], rtol=1e-6)
    # block_1 is the last block's output: the final norm + mean of it are the pre-logits.
    norm = params["norm"]
    if name.startswith("resmlp"):
        normed = norm["beta"] + norm["alpha"] * feats["block_1"]
    else:
        mean = feats["block_1"].mean(-1, keepdims=True)
        var = feats["block_1"].var(-1, keepdims=True)
        normed = (feats["block_1"] - mean) / jnp.sqrt(var + 1e-6) * norm["scale"] + norm["bias"]
    np.testing.assert_allclose(normed.mean(1), feats["pre_logits"], rtol=1e-4, atol=1e-5)


# Per-block checkpointing on each path (unrolled: `nn.remat` of the block; scanned: of
# the scan body), one family each: both families run the same block runner.
@pytest.mark.parametrize("name, kw", [
    ("resmlp_12_224", dict(remat=True)),
    pytest.param("gmlp_ti16_224", dict(scan=True, remat=True), marks=pytest.mark.slow)])
def test_remat_matches_plain_logits_and_grads(name, kw):
    model, params = tiny(name)
    layout = models.get_family(name).block_layout
    x = images()

    def loss(p, m):
        return jnp.sum(m.apply({"params": p}, x) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref_loss, ref_grads = value_and_grad(params, model)
    p = layout.stack(params) if kw.get("scan") else params
    val, grads = value_and_grad(p, model.clone(**kw))
    grads = layout.unstack(grads)
    np.testing.assert_allclose(val, ref_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads, ref_grads)


@pytest.mark.parametrize("name", FAMILIES)
def test_stochastic_depth_drops_every_block_at_the_same_rate(name):
    """timm's rule: every block gets `drop_path_rate` (no ramp). At rate 1 every branch,
    the first block's included, is dropped: each block passes its input through."""
    model, params = tiny(name, stoch_depth=1.0)
    _, feats = jax.jit(lambda rng: model.apply(
        {"params": params}, images(4), train=True, return_intermediates=True,
        rngs={"dropout": rng}))(jax.random.key(0))
    np.testing.assert_array_equal(feats["block_1"], feats["stem"])


def test_regularisation_only_in_training():
    """Stochastic depth and dropout: training draws differ, evaluation ignores both
    (one family: the rate handling is shared)."""
    model, params = tiny("gmlp_ti16_224", stoch_depth=0.5, dropout=0.3)
    apply = jax.jit(lambda rng, m, train: m.apply(
        {"params": params}, images(4), train=train, rngs={"dropout": rng}), static_argnums=(1, 2))
    plain = apply(jax.random.key(0), model, False)
    a, b = apply(jax.random.key(0), model, True), apply(jax.random.key(1), model, True)
    assert not np.allclose(a, plain, atol=1e-4) and not np.allclose(a, b, atol=1e-4)
    unregularised = apply(jax.random.key(0), model.clone(stoch_depth=0.0, dropout=0.0), True)
    np.testing.assert_allclose(plain, unregularised, rtol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_image_size_errors(name):
    model, params = tiny(name)
    apply = jax.jit(model.apply)  # the errors are raised while tracing
    with pytest.raises(ValueError, match="18x18 is not divisible by the patch size 4"):
        apply({"params": params}, images(size=18))
    # The token linear was initialised for 16 tokens (16x16 images); 24x24 gives 36.
    with pytest.raises(ValueError, match="36 tokens.*mix 16"):
        apply({"params": params}, images(size=24))
    # Any patch-divisible size works when the model is initialised at it (2x6 patches).
    wide = models.param_shapes(model, (8, 24, 3))
    token = flat(wide)[[k for k in flat(wide) if k.endswith("proj/kernel") or
                        k.endswith("linear_tokens/kernel")][0]]
    assert token.shape == (12, 12)
    assert jax.eval_shape(model.apply, {"params": wide}, images(size=24)[:, :8]).shape == (2, 5)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("name", FAMILIES)
def test_parameters_declare_logical_axes(name, scan):
    model = models.create_model(name, **tiny_fields(scan=scan))
    axes = flat(models.param_axes(model, (16, 16, 3)))
    shapes = flat(models.param_shapes(model, (16, 16, 3)))
    assert all(len(axes[k]) == len(v.shape) and None not in axes[k] for k, v in shapes.items())
    layout = models.get_family(name).block_layout
    block, lead = ((f"{layout.scanned}/block/", ("layers",)) if scan
                   else (f"{layout.prefix}0/", ()))
    token = "linear_tokens" if name.startswith("resmlp") else "mlp_channels/gate/proj"
    assert axes[f"{block}{token}/kernel"] == lead + ("tokens", "tokens")
    assert axes[f"{block}{token}/bias"] == lead + ("tokens",)
    # Only the token-mixing parameters carry "tokens".
    with_tokens = [k for k, v in axes.items() if "tokens" in v]
    assert len(with_tokens) == (2 if scan else 4)  # 2 blocks
    assert all(k.endswith((f"/{token}/kernel", f"/{token}/bias")) for k in with_tokens)
    assert axes[f"{block}mlp_channels/fc1/kernel"] == lead + ("embed", "mlp")
    assert axes["head/kernel"] == ("embed", "classes")
    assert axes["stem/kernel"] == ("kernel", "kernel", "channels", "embed")


def test_init_follows_timm():
    """Layer scales per depth (timm: 1e-4, 1e-5, 1e-6, 1e-6); Affine 1/0; Linear kernels
    Xavier uniform; the gate projection starts at weight ~N(0, 1e-6), bias 1."""
    for name, value in (("resmlp_12_224", 1e-4), ("resmlp_24_224", 1e-5),
                        ("resmlp_36_224", 1e-6), ("resmlp_big_24_224", 1e-6)):
        assert models.create_model(name).layer_scale_init == value
    # One block / one gating unit: the same modules the models build, cheaper to compile.
    block = resmlp.ResBlock(mlp_dim=512, layer_scale_init=1e-5)
    p = flat(jax.jit(block.init)(jax.random.key(0), jnp.zeros((1, 16, 64)))["params"])
    p = jax.tree.map(np.asarray, nn.meta.unbox(p))
    np.testing.assert_array_equal(p["ls2"], np.full(64, 1e-5, np.float32))
    np.testing.assert_array_equal(p["norm1/alpha"], np.ones(64))
    np.testing.assert_array_equal(p["norm1/beta"], np.zeros(64))
    fc1 = p["mlp_channels/fc1/kernel"]
    assert np.abs(fc1).max() <= math.sqrt(6 / (64 + 512))
    assert float(np.std(fc1)) == pytest.approx(math.sqrt(2 / (64 + 512)), rel=0.05)
    gate = gmlp.SpatialGatingUnit()
    p = flat(jax.jit(gate.init)(jax.random.key(0), jnp.zeros((1, 256, 8)))["params"])
    p = jax.tree.map(np.asarray, nn.meta.unbox(p))
    assert 0.5e-6 < float(np.std(p["proj/kernel"])) < 2e-6  # 256 x 256 draws
    np.testing.assert_array_equal(p["proj/bias"], np.ones(256))


# Only compiled, never run. XLA also counts norms, adds and exact GELU's erf (64 FLOPs an
# element, again in each fusion that reads it: +13% for gMLP at width 512), so each shape
# lets the matmuls of one kind dominate: channel MLPs (wide, 64 tokens), then the token
# linear / gating projection (4096 tokens of width 32).
@pytest.mark.parametrize("size, patch, width", [(32, 4, 2048), (128, 2, 32)])
@pytest.mark.parametrize("name", FAMILIES)
def test_analytic_flops_match_xla(name, size, patch, width):
    model = models.create_model(name, **tiny_fields(patch_size=patch, hidden_dim=width,
                                                    mlp_dim=4 * width, num_classes=10))
    params = models.param_shapes(model, (size, size, 3))
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    compiled = jax.jit(model.apply).lower({"params": params}, x).compile()
    analytic = models.get_family(name).flops(model, (size, size))
    assert analytic["stem"] == 2 * (size // patch) ** 2 * patch**2 * 3 * width
    ratio = flops_lib.xla_flops(compiled) / sum(analytic.values())
    assert 1.0 <= ratio < 1.05, ratio
    with pytest.raises(ValueError, match="not divisible"):
        models.get_family(name).flops(model, (size - 1, size))


@pytest.mark.parametrize("name", FAMILIES)
def test_dtype_and_param_dtype(name):
    """Computed in `dtype`, parameters held in `param_dtype` (abstractly: nothing runs)."""
    model = models.create_model(name, **tiny_fields(dtype=jnp.bfloat16))
    shapes = models.param_shapes(model, (16, 16, 3))
    assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(model.apply, {"params": shapes}, images())
    assert out.dtype == jnp.bfloat16
    half = models.param_shapes(model.clone(param_dtype=jnp.bfloat16), (16, 16, 3))
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
