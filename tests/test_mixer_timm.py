"""MLP-Mixer under timm's names and gMixer: counts, timm's keys, logits parity with timm."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import checkpoint, models
from mixer_jax.benchmark import flops as benchmark_flops

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

# timm 1.0's `sum(p.numel() for p in timm.create_model(name).parameters())`.
TIMM_PARAM_COUNTS = {
    "mixer_s32_224": 19_104_624,
    "mixer_s16_224": 18_528_264,
    "mixer_b32_224": 60_293_428,
    "mixer_b16_224": 59_880_472,
    "mixer_l32_224": 206_939_264,
    "mixer_l16_224": 208_196_168,
    "gmixer_12_224": 12_701_080,
    "gmixer_24_224": 24_721_096,
}
QUICK = ("mixer_s32_224", "gmixer_12_224")
NAMES = [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in TIMM_PARAM_COUNTS]


def test_names_and_families():
    assert set(models.list_models("mixer_*")) == {n for n in TIMM_PARAM_COUNTS if "gmixer" not in n}
    assert models.list_models("gmixer_*") == ["gmixer_12_224", "gmixer_24_224"]
    assert models.get_family("gmixer_12_224").name == "gmixer"
    mixer = models.get_family("mixer_b16_224")
    assert mixer is models.get_family("Mixer-B_16") and mixer.timm_names["Mixer-B_16"] == "mixer_b16_224"
    # Same architecture as Google's name, timm's numerics.
    google, ours = models.create_model("Mixer-B_16"), models.create_model("mixer_b16_224")
    assert ours.clone(gelu_approximate=True, uniform_drop_path=False) == google
    assert google.gelu_approximate and not ours.gelu_approximate


@pytest.mark.parametrize("name", NAMES)
def test_count_keys_and_shapes_match_timm(name):
    """Counts and `to_timm` of our abstract shapes against timm's meta-device state dict."""
    family = models.get_family(name)
    shapes = checkpoint.flatten_params(models.param_shapes(models.create_model(name)))
    assert sum(math.prod(s.shape) for s in shapes.values()) == TIMM_PARAM_COUNTS[name]
    with torch.device("meta"):
        reference = timm.create_model(name).state_dict()
    ours = family.to_timm({k: np.broadcast_to(np.zeros((), np.float32), s.shape)
                           for k, s in shapes.items()})
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in reference.items()}


def timm_model(name: str, num_blocks: int | None, size: int):
    """timm's model with its first `num_blocks` blocks, random non-trivial weights
    (norm scales around 1, biases and the head away from their zero init)."""
    with torch.device("meta"):
        model = timm.create_model(name, img_size=size)
    if num_blocks:
        model.blocks = model.blocks[:num_blocks]
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.2 * noise + (1.0 if "norm" in key and key.endswith("weight") else 0.0))
    return model


def assert_parity(name: str, num_blocks: int | None, size: int):
    tm = timm_model(name, num_blocks, size)
    family = models.get_family(name)
    state_dict = {k: v.numpy() for k, v in tm.state_dict().items()}
    flat = family.from_timm(state_dict)
    overrides = {"num_blocks": num_blocks} if num_blocks else {}
    model = models.create_model(name, **overrides)
    images = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(model.apply)({"params": checkpoint.unflatten_params(flat)}, images))
    with torch.no_grad():
        theirs = tm(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    assert np.abs(ours - theirs).max() < 1e-4 * np.abs(theirs).max()

    back = family.to_timm(flat)  # into a fresh timm model, strictly
    assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype
               for k, v in state_dict.items())
    fresh = timm_model(name, num_blocks, size)
    fresh.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in back.items()},
                          strict=True)
    with torch.no_grad():
        np.testing.assert_array_equal(fresh(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy(),
                                      theirs)


@pytest.mark.parametrize("name", NAMES)
def test_logits_parity_with_timm(name):
    """Every name's architecture with 2 blocks, at 2 patches per side (fewer blocks and a
    small image to fit the time budget; the full depth is in the test below)."""
    patch = models.create_model(name).patch_size
    assert_parity(name, 2, 2 * patch)


@pytest.mark.slow
@pytest.mark.parametrize("name", QUICK)
def test_logits_parity_with_timm_full_depth_and_size(name):
    assert_parity(name, None, 224)


def test_gated_mlp_is_timms_glu_split():
    """`Dense_0` is the first half of timm's fc1 (multiplied), `gate` the second (SiLU)."""
    block = models.MlpBlock(mlp_dim=3, gated=True)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    params = jax.device_get(nn.meta.unbox(block.init(jax.random.key(0), x, train=False)["params"]))
    params = jax.tree.map(lambda v: v + 0.3, params)
    y = block.apply({"params": params}, x, train=False)
    lin = lambda p, v: v @ p["kernel"] + p["bias"]
    want = lin(params["Dense_1"], lin(params["Dense_0"], x) * jax.nn.silu(lin(params["gate"], x)))
    np.testing.assert_allclose(y, want, rtol=1e-5)
    glu = timm.layers.GluMlp(4, 6, act_layer=torch.nn.SiLU)  # timm's fc1: [Dense_0 | gate]
    with torch.no_grad():
        glu.fc1.weight.copy_(torch.from_numpy(np.concatenate(
            [params["Dense_0"]["kernel"], params["gate"]["kernel"]], 1).T))
        glu.fc1.bias.copy_(torch.from_numpy(np.concatenate(
            [params["Dense_0"]["bias"], params["gate"]["bias"]])))
        glu.fc2.weight.copy_(torch.from_numpy(params["Dense_1"]["kernel"].T))
        glu.fc2.bias.copy_(torch.from_numpy(params["Dense_1"]["bias"]))
        np.testing.assert_allclose(glu(torch.from_numpy(x)).numpy(), y, rtol=1e-5)


@pytest.mark.slow
def test_gated_scan_equals_unrolled_and_flops_match_xla():
    model = models.create_model("gmixer_12_224", num_blocks=2, num_classes=5)
    params = jax.tree.map(lambda v: v + 0.1, models.init_params(model, jax.random.key(0), (32, 32, 3)))
    images = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 32, 3)), jnp.float32)
    plain = jax.jit(model.apply)({"params": params}, images)
    scanned = model.clone(scan=True)
    np.testing.assert_allclose(
        jax.jit(scanned.apply)({"params": models.stack_blocks(params)}, images), plain, rtol=1e-5,
        atol=1e-6)
    # FLOPs at 8x8 tokens (at 2x2 the elementwise ops XLA counts too are not negligible).
    size = (128, 128)
    analytic = sum(models.get_family("gmixer_12_224").flops(model, size).values())
    compiled = jax.jit(model.apply).lower({"params": models.param_shapes(model, (*size, 3))},
                                          jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
                                          ).compile()
    assert abs(analytic - benchmark_flops.xla_flops(compiled)) < 0.03 * analytic


def test_timm_names_drop_path_uniformly():
    """timm gives every MlpMixer block drop_path_rate; Google's names rise linearly from 0."""
    np.testing.assert_allclose(models.create_model("gmixer_12_224", stoch_depth=0.1).drop_rates(),
                               np.full(12, 0.1))
    np.testing.assert_allclose(models.create_model("mixer_s32_224", stoch_depth=0.1).drop_rates(),
                               np.full(8, 0.1))
    np.testing.assert_allclose(models.create_model("Mixer-S_32", stoch_depth=0.1).drop_rates(),
                               np.linspace(0, 0.1, 8))
