"""Fine-tuning adaptation driven by logical axes: a square token map (ResMLP's token
linear, gMLP's spatial gating projection) on a stand-in family registered for the test."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import checkpoint, finetune, models, resolution
from mixer_jax.checkpoint import CheckpointError
from mixer_jax.models import layers, registry

SIZE, PATCH, CLASSES = 8, 2, 5  # 4x4 token grid


class TokenLinear(nn.Module):
    """Patch stem, one residual block mixing tokens with a square [S, S] map, mean pool,
    head: every layer but the token map acts per token, so a block-diagonal token map
    makes the logits on a tiled image the mean of the logits on its tiles."""

    patch_size: int
    hidden_dim: int
    num_classes: int | None = 1000

    @nn.compact
    def __call__(self, images, *, train=False, return_intermediates=False):
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
        p = self.patch_size
        x = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), name="stem",
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), ("kernel", "kernel", "channels", "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(images)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        y = layers.layer_norm(name="norm", **kw)(x)
        y = layers.dense(x.shape[1], ("tokens", "tokens"), name="token_linear", **kw)(
            jnp.swapaxes(y, 1, 2))
        x = x + jnp.swapaxes(jnp.tanh(y), 1, 2)
        x = jnp.mean(x, axis=1)
        return layers.dense(self.num_classes, ("embed", "classes"), name="head", **kw)(x)


def architecture(flat):
    if "token_linear/kernel" not in flat:
        raise ValueError("not a token-linear model")
    return dict(patch_size=flat["stem/kernel"].shape[0], hidden_dim=flat["stem/kernel"].shape[-1])


@pytest.fixture
def family(monkeypatch):
    """Registers the stand-in family for one test only."""
    fam = registry.Family(name="tokenlinear", module=TokenLinear,
                          variants={"tokenlinear_test": dict(patch_size=PATCH, hidden_dim=6)},
                          architecture=architecture)
    monkeypatch.setitem(registry._FAMILIES, fam.name, fam)
    monkeypatch.setitem(registry._BY_MODEL, "tokenlinear_test", fam)
    return fam


def random_params(model, size, seed):
    height, width = (size, size) if isinstance(size, int) else size
    shapes = models.param_shapes(model, (height, width, 3))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.5, shapes)


@functools.cache
def apply_fn(model):
    return jax.jit(model.apply)


def logits(model, params, images):
    return np.asarray(apply_fn(model)({"params": params}, images))


@pytest.mark.parametrize("factors", [(2, 2), (2, 3)])
def test_block_diagonal_square_token_map_gives_the_tile_mean(family, factors):
    model = models.create_model("tokenlinear_test", num_classes=CLASSES)
    pretrained = random_params(model, SIZE, seed=0)
    size = (SIZE * factors[0], SIZE * factors[1])
    # No architecture field follows the token count of a square map: nothing to widen.
    assert finetune.adapted_model_overrides(pretrained, size) == {"patch_size": 2, "hidden_dim": 6}
    fresh = random_params(model, size, seed=1)
    params = finetune.load_pretrained(pretrained, fresh, image_size=size)
    kernel = params["token_linear"]["kernel"]
    tokens = (size[0] // PATCH) * (size[1] // PATCH)
    assert kernel.shape == (tokens, tokens)
    assert np.count_nonzero(kernel) == factors[0] * factors[1] * 16 ** 2  # one 16x16 map per tile
    image = jax.random.uniform(jax.random.key(2), (2, *size, 3), minval=-1, maxval=1)
    tiles = [image[:, r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE]
             for r in range(factors[0]) for c in range(factors[1])]
    expected = np.mean([logits(model, pretrained, t) for t in tiles], axis=0)
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(logits(model, params, image), expected, rtol=1e-5, atol=1e-5)


def test_square_token_map_resample_and_errors(family):
    model = models.create_model("tokenlinear_test", num_classes=CLASSES)
    pretrained = random_params(model, SIZE, seed=0)
    fresh = random_params(model, 12, seed=1)  # 6x6 grid: factor 1.5 -> resampled
    params = finetune.load_pretrained(pretrained, fresh)
    assert params["token_linear"]["kernel"].shape == (36, 36)
    np.testing.assert_array_equal(params["stem"]["kernel"], pretrained["stem"]["kernel"])
    out = logits(model, params, jnp.ones((1, 12, 12, 3)))
    assert np.isfinite(out).all()
    # the same grid: resampling is the identity
    same = resolution.resample_array(pretrained["token_linear"]["kernel"], ("tokens", "tokens"),
                                     (4, 4), (4, 4))
    np.testing.assert_array_equal(same, pretrained["token_linear"]["kernel"])
    # a Mixer file into this family's model: one message naming both
    mixer = models.param_shapes(models.create_model("Mixer-Ti_4", num_classes=CLASSES),
                                (SIZE, SIZE, 3))
    fake = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), mixer)
    with pytest.raises(CheckpointError, match=r"this file is Mixer-Ti_4 \(mixer\), the model is "
                       r"tokenlinear_test \(tokenlinear\)"):
        finetune.load_pretrained(fake, fresh)


def test_read_source_resolves_once_and_registered_readers_come_first(family, tmp_path,
                                                                     monkeypatch):
    model = models.create_model("Mixer-Ti_4", num_classes=CLASSES)
    params = random_params(model, 16, seed=0)
    path = checkpoint.save_npz(params, tmp_path / "p.npz")
    source = finetune.read_source(path)
    assert source.name == repr(path) and source.preprocessing is None
    assert finetune.read_source(source) is source
    assert finetune.identify(source.flat)[0].name == "mixer"
    custom = finetune.Source(source.flat, "custom", registry.IMAGENET, "Mixer-Ti_4")
    monkeypatch.setattr(finetune, "_READERS", [])
    finetune.register_reader(lambda p: p.endswith(".custom"), lambda p: custom)
    assert finetune.read_source(str(tmp_path / "x.custom")) is custom
    with pytest.raises(CheckpointError, match="not a checkpoint of any registered model family"):
        finetune.identify({"foo/bar": np.zeros(3)})


def test_preprocessing_precedence_in_training():
    """pp.mean/pp.std as set, else the pretrained source's, else the family's."""
    from mixer_jax import train, train_config

    class NoCheckpoint:
        def latest_step(self):
            return None

    config = train_config.with_defaults(train_config.base_config())
    config.model_name = "Mixer-Ti_4"
    source = finetune.Source({}, "x", registry.IMAGENET)
    pretrained = train.Pretrained("x", source, source, None)
    assert train._with_preprocessing(config, NoCheckpoint(), None).pp.mean == (0.5,) * 3
    assert train._with_preprocessing(config, NoCheckpoint(), pretrained).pp.std == \
        registry.IMAGENET.std
    config.pp.mean = (0.1, 0.2, 0.3)
    chosen = train._with_preprocessing(config, NoCheckpoint(), pretrained)
    assert chosen.pp.mean == (0.1, 0.2, 0.3) and chosen.pp.std == registry.IMAGENET.std
    assert train_config.preprocessing(chosen).mean == (0.1, 0.2, 0.3)


def test_timm_state_dict_is_a_source_for_fine_tuning():
    """A timm state dict (timm's keys and layouts) goes through the same fine-tuning path."""
    pytest.importorskip("safetensors")
    model = models.create_model("mixer_s32_224")
    params = random_params(model, 224, seed=0)
    state_dict = models.get_family("mixer_s32_224").to_timm(checkpoint.flatten_params(params))
    source = finetune.read_source(state_dict)
    assert source.model_name == "mixer_s32_224" and source.preprocessing is not None
    fresh = random_params(models.create_model("mixer_s32_224", num_classes=CLASSES), 224, 1)
    loaded = finetune.load_pretrained(state_dict, fresh)
    np.testing.assert_array_equal(loaded["MixerBlock_7"]["token_mixing"]["Dense_1"]["kernel"],
                                  params["MixerBlock_7"]["token_mixing"]["Dense_1"]["kernel"])
    np.testing.assert_array_equal(loaded["head"]["kernel"], fresh["head"]["kernel"])  # reset
