"""Published-format checkpoints: round trips, both layouts, bad files, fine-tuning adaptation."""
import functools
import os
import re
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixer_jax import checkpoint, models, resolution
from mixer_jax.checkpoint import CheckpointError

VARIANT = "Mixer-Ti_4"  # patch 4, 2 blocks, hidden 64, token MLP 32, channel MLP 128
SIZE = 16  # 4x4 patch grid, 16 tokens
CLASSES = 10


def make_model(image_size=SIZE, **overrides):
    return models.create_model(VARIANT, **{"num_classes": CLASSES, **overrides})


def random_params(image_size=SIZE, seed=0, **overrides):
    """(model, params) with random non-zero float32 values on every leaf, head included.

    Built from the model's abstract init (no compilation): kernels ~ N(0, 1/fan_in),
    biases ~ N(0, 0.01), LayerNorm scales ~ 1 + N(0, 0.01).
    """
    model = make_model(**overrides)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    shapes = models.param_shapes(model, (height, width, 3))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            return (noise / np.sqrt(np.prod(leaf.shape[:-1]))).astype(leaf.dtype)
        return ((1.0 if name == "scale" else 0.0) + 0.1 * noise).astype(leaf.dtype)

    return model, jax.tree_util.tree_map_with_path(fill, shapes)


def init_params(image_size, **overrides):
    """Stand-in for a new model's freshly initialised parameters (different values)."""
    return random_params(image_size, seed=3, **overrides)


@functools.cache
def jitted_apply(model):
    return jax.jit(model.apply)


def logits(model, params, images):
    return np.asarray(jitted_apply(model)({"params": params}, images))


def images(shape, seed=0):
    return jax.random.uniform(jax.random.key(seed), (2, *shape, 3), minval=-1, maxval=1)


def assert_trees_equal(a, b):
    flat_a, flat_b = checkpoint.flatten_params(a), checkpoint.flatten_params(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        x, y = np.asarray(flat_a[key]), np.asarray(flat_b[key])
        assert x.dtype == y.dtype and x.shape == y.shape, key
        np.testing.assert_array_equal(x, y, err_msg=key)


@pytest.fixture(scope="module")
def trained():
    """A tiny 'pre-trained' model with random weights, and its file."""
    return random_params()


@pytest.fixture
def npz(tmp_path, trained):
    return checkpoint.save_npz(trained[1], tmp_path / "ti4.npz")


# ------------------------------------------------------------------ format and round trips


def test_mixer_b16_keys_and_shapes_match_the_published_files():
    model = models.create_model("Mixer-B_16")
    shapes = models.param_shapes(model, (224, 224, 3))
    flat = checkpoint.flatten_params(shapes)
    assert len(flat) == 150
    expected = {
        "stem/kernel": (16, 16, 3, 768), "stem/bias": (768,),
        "MixerBlock_11/LayerNorm_0/scale": (768,),
        "MixerBlock_11/token_mixing/Dense_0/kernel": (196, 384),
        "MixerBlock_11/token_mixing/Dense_1/kernel": (384, 196),
        "MixerBlock_11/token_mixing/Dense_1/bias": (196,),
        "MixerBlock_0/channel_mixing/Dense_0/kernel": (768, 3072),
        "MixerBlock_0/channel_mixing/Dense_1/kernel": (3072, 768),
        "pre_head_layer_norm/bias": (768,), "head/kernel": (768, 1000), "head/bias": (1000,),
    }
    assert {k: flat[k].shape for k in expected} == expected
    arch = checkpoint.architecture(shapes)
    assert (arch.name, arch.num_tokens, arch.num_classes) == ("Mixer-B_16", 196, 1000)


def test_round_trip_is_bitwise_exact_with_slash_keys(tmp_path, trained):
    params = jax.tree.map(jnp.asarray, trained[1])  # jax arrays in, numpy out
    path = checkpoint.save_npz(params, tmp_path / "sub" / "p.npz")
    assert path == str(tmp_path / "sub" / "p.npz")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    assert "MixerBlock_1/token_mixing/Dense_0/kernel.npy" in names
    assert not any("\\" in n for n in names)
    loaded = checkpoint.load_npz(path)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
    assert_trees_equal(loaded, params)
    assert os.listdir(tmp_path / "sub") == ["p.npz"]  # no temporary left behind


def test_scanned_params_save_in_the_per_block_layout_and_load_back_scanned(tmp_path):
    model, params = random_params(scan=True)
    assert models.SCANNED_BLOCKS in params
    path = checkpoint.save_npz(params, tmp_path / "scan.npz")
    assert_trees_equal(checkpoint.load_npz(path), models.unstack_blocks(params))
    _, fresh = init_params(SIZE, scan=True)
    restored = checkpoint.load_pretrained(path, fresh)
    assert_trees_equal(restored, params)


def test_bfloat16_params_are_written_as_exact_float32(tmp_path, trained):
    bf16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), trained[1])
    loaded = checkpoint.load_npz(checkpoint.save_npz(bf16, tmp_path / "bf16.npz"))
    assert_trees_equal(loaded, jax.tree.map(lambda x: np.asarray(x, np.float32), bf16))


def to_old_layout(flat):
    """The older published layout, with an extra leading singleton dim on the MLP arrays."""
    out = {}
    for key, value in flat.items():
        value = np.asarray(value)
        mlp = re.fullmatch(r"MixerBlock_(\d+)/(token|channel)_mixing/Dense_(\d)/(kernel|bias)", key)
        if mlp:
            block, kind, dense, param = mlp.groups()
            key = f"Mixer/encoderblock_{block}/{kind}_mixing_phase_0/{param}{int(dense) + 1}"
            value = value[None]
        elif key.startswith("MixerBlock_"):
            key = "Mixer/encoderblock_" + key[len("MixerBlock_"):]
        elif key.startswith("stem/"):
            key = "embedding/" + key[len("stem/"):]
        elif key.startswith("pre_head_layer_norm/"):
            key = "Mixer/encoder_norm/" + key[len("pre_head_layer_norm/"):]
        out[key] = value
    return out


def test_older_layout_loads_to_the_same_params(tmp_path, trained):
    old = to_old_layout(checkpoint.flatten_params(trained[1]))
    assert "Mixer/encoderblock_1/token_mixing_phase_0/kernel2" in old
    np.savez(tmp_path / "old.npz", **old)
    assert_trees_equal(checkpoint.load_npz(tmp_path / "old.npz"), trained[1])


def test_keys_with_windows_separators_load(tmp_path, trained):
    flat = checkpoint.flatten_params(trained[1])
    np.savez(tmp_path / "win.npz", **{k.replace("/", "\\"): np.asarray(v) for k, v in flat.items()})
    assert_trees_equal(checkpoint.load_npz(tmp_path / "win.npz"), trained[1])


def test_non_local_paths_go_through_gfile(trained):
    path = "ram://mixer_ckpt_test/run/p.npz"
    checkpoint.save_npz(trained[1], path)
    assert_trees_equal(checkpoint.load_npz(path), trained[1])


def test_failed_save_keeps_the_previous_file(tmp_path, trained, monkeypatch):
    path = checkpoint.save_npz(trained[1], tmp_path / "p.npz")
    before = open(path, "rb").read()
    _, other = random_params(seed=7)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # local files: renamed without TensorFlow
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_npz(other, path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["p.npz"]


def test_saving_nan_params_is_refused(tmp_path, trained):
    flat = checkpoint.flatten_params(trained[1])
    flat["stem/bias"] = np.where(np.arange(64) == 3, np.nan, flat["stem/bias"])
    with pytest.raises(CheckpointError, match="'stem/bias'.*NaN"):
        checkpoint.save_npz(checkpoint.unflatten_params(flat), tmp_path / "nan.npz")
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------- bad files


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def good_flat(trained):
    return {k: np.asarray(v) for k, v in checkpoint.flatten_params(trained[1]).items()}


BAD_FILES = {
    "truncated": (lambda p, t: p.write_bytes(open(checkpoint.save_npz(t[1], p), "rb").read()[:5000]),
                  r"truncated or corrupt \.npz"),
    "corrupt_member": (
        lambda p, t: p.write_bytes(
            (lambda b: b[:2000] + bytes([b[2000] ^ 0xFF]) + b[2001:])(
                open(checkpoint.save_npz(t[1], p), "rb").read())),
        r"array 'MixerBlock_0/[^']*' is truncated or corrupt \(Bad CRC"),
    "text": (lambda p, t: p.write_text("not a checkpoint"), r"not an \.npz file"),
    "npy": (lambda p, t: np.save(open(p, "wb"), np.zeros(3)), r"single \.npy array"),
    "empty": (lambda p, t: write_npz(p), "holds no arrays"),
    "object": (lambda p, t: write_npz(p, **{**good_flat(t), "stem/bias": np.array([{"a": 1}])}),
               "'stem/bias' is an object array"),
    "nan": (lambda p, t: write_npz(p, **{**good_flat(t), "head/bias": np.full(CLASSES, np.nan)}),
            r"'head/bias' \(shape \(10,\)\) holds 10 NaN/Inf"),
    "inf": (lambda p, t: write_npz(p, **{**good_flat(t), "stem/kernel": np.full((4, 4, 3, 64), np.inf)}),
            "'stem/kernel'.*NaN/Inf"),
    "int": (lambda p, t: write_npz(p, **{**good_flat(t), "stem/bias": np.zeros(64, np.int32)}),
            "'stem/bias' has dtype int32"),
    "not_mixer": (lambda p, t: write_npz(p, **{"Transformer/encoder_norm/scale": np.ones(3)}),
                  "no array 'stem/kernel'"),
    "mixed_layouts": (lambda p, t: write_npz(p, **{**good_flat(t), "embedding/bias": np.ones(64)}),
                      "mixes the older layout"),
    "missing_block": (
        lambda p, t: write_npz(p, **{k: v for k, v in good_flat(t).items()
                                     if not k.startswith("MixerBlock_0/")}),
        "lacks MixerBlock_0 but has MixerBlock_1"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gives_one_clear_error(tmp_path, trained, case):
    make, message = BAD_FILES[case]
    path = tmp_path / "bad.npz"
    make(path, trained)
    with pytest.raises(CheckpointError, match=message) as error:
        checkpoint.load_npz(path)
    assert str(path) in str(error.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint file at"):
        checkpoint.load_npz(tmp_path / "absent.npz")
    with pytest.raises(CheckpointError, match="is a directory"):
        checkpoint.load_npz(tmp_path)


# ------------------------------------------------------------------------------- head


def test_head_kept_when_class_count_matches_and_reset_on_request(npz, trained):
    model, fresh = init_params(SIZE)
    kept = checkpoint.load_pretrained(npz, fresh)
    assert_trees_equal(kept, trained[1])
    reset = checkpoint.load_pretrained(npz, fresh, reset_head=True)
    np.testing.assert_array_equal(reset["head"]["kernel"], fresh["head"]["kernel"])
    np.testing.assert_array_equal(reset["stem"]["kernel"], trained[1]["stem"]["kernel"])


def test_head_replaced_when_class_count_differs(npz, trained):
    _, fresh = init_params(SIZE, num_classes=3)
    params = checkpoint.load_pretrained(npz, fresh)
    assert params["head"]["kernel"].shape == (64, 3)
    np.testing.assert_array_equal(params["head"]["bias"], fresh["head"]["bias"])
    np.testing.assert_array_equal(params["MixerBlock_1"]["channel_mixing"]["Dense_1"]["kernel"],
                                  trained[1]["MixerBlock_1"]["channel_mixing"]["Dense_1"]["kernel"])
    with pytest.raises(CheckpointError, match=r"'head/kernel': the model expects shape \(64, 3\), "
                       r".* has \(64, 10\): the file has a 10-class head, the model 3 classes"):
        checkpoint.load_pretrained(npz, fresh, reset_head=False)


def test_headless_model_ignores_the_file_head(npz, trained):
    model, fresh = init_params(SIZE, num_classes=None)
    params = checkpoint.load_pretrained(npz, {"params": fresh})["params"]
    assert "head" not in params
    np.testing.assert_array_equal(params["pre_head_layer_norm"]["scale"],
                                  trained[1]["pre_head_layer_norm"]["scale"])


def test_result_takes_the_init_dtypes(npz):
    _, fresh = init_params(SIZE, param_dtype=jnp.bfloat16)
    params = checkpoint.load_pretrained(npz, fresh)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}


# ---------------------------------------------------------------- resolution adaptation


def tile_mean_logits(model, params, image, factors):
    """Mean of the pre-trained model's logits over the kh x kw tiles of `image`."""
    kh, kw = factors
    tiles = [image[:, r * SIZE:(r + 1) * SIZE, c * SIZE:(c + 1) * SIZE]
             for r in range(kh) for c in range(kw)]
    return np.mean([logits(model, params, t) for t in tiles], axis=0)


@pytest.mark.parametrize("factors,scan", [((2, 2), False), ((3, 3), False), ((2, 3), True)])
def test_block_diagonal_logits_equal_the_mean_over_tiles(npz, trained, factors, scan):
    model, pretrained = trained
    size = (SIZE * factors[0], SIZE * factors[1])
    overrides = checkpoint.adapted_model_overrides(npz, size)
    assert overrides == {**models.VARIANTS[VARIANT], "tokens_mlp_dim": 32 * factors[0] * factors[1]}
    big_model, fresh = init_params(size, scan=scan, **overrides)
    params = checkpoint.load_pretrained(
        npz, fresh, image_size=None if factors[0] == factors[1] else size)
    image = images(size, seed=5)
    expected = tile_mean_logits(model, pretrained, image, factors)
    got = logits(big_model, params, image)
    assert np.abs(expected).max() > 0.1  # a head with real weights, not the zero init
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_block_diagonal_token_order_matters(npz, trained):
    """Control: plain block-diagonal kernels (tokens assumed tile-major) miss the tile mean.

    The model's tokens are in raster order, so the tile-mean test above can only
    pass if the kernels' rows/columns are scattered to each token's tile.
    """
    model, pretrained = trained
    big_model, fresh = init_params(2 * SIZE, tokens_mlp_dim=128)
    params = checkpoint.load_pretrained(npz, fresh)
    image = images((2 * SIZE, 2 * SIZE), seed=5)
    naive = jax.tree.map(np.copy, params)
    for i in range(2):
        mlp = pretrained[f"MixerBlock_{i}"]["token_mixing"]
        dense0 = naive[f"MixerBlock_{i}"]["token_mixing"]["Dense_0"]
        dense1 = naive[f"MixerBlock_{i}"]["token_mixing"]["Dense_1"]
        dense0["kernel"] = np.kron(np.eye(4), mlp["Dense_0"]["kernel"])
        dense1["kernel"] = np.kron(np.eye(4), mlp["Dense_1"]["kernel"])
        dense1["bias"] = np.tile(mlp["Dense_1"]["bias"], 4)
    expected = tile_mean_logits(model, pretrained, image, (2, 2))
    assert not np.allclose(logits(big_model, naive, image), expected, rtol=1e-3, atol=1e-3)


def test_resample_on_the_same_grid_is_the_identity(npz, trained):
    mlp = jax.tree.map(np.asarray, trained[1]["MixerBlock_0"]["token_mixing"])
    same = resolution.resample(mlp, (4, 4), (4, 4))
    assert_trees_equal(same, mlp)
    model, fresh = init_params(SIZE)
    params = checkpoint.load_pretrained(npz, fresh, token_mixing="resample")
    assert_trees_equal(params, trained[1])


@pytest.mark.parametrize("size", [24, 12])  # grid 4x4 -> 6x6 (factor 1.5) and -> 3x3
def test_resample_to_other_grids_gives_finite_logits(npz, size):
    assert checkpoint.adapted_model_overrides(npz, size)["tokens_mlp_dim"] == 32
    model, fresh = init_params(size)
    params = checkpoint.load_pretrained(npz, fresh)
    tokens = (size // 4) ** 2
    assert params["MixerBlock_1"]["token_mixing"]["Dense_0"]["kernel"].shape == (tokens, 32)
    assert params["MixerBlock_1"]["token_mixing"]["Dense_1"]["bias"].shape == (tokens,)
    out = logits(model, params, images((size, size)))
    assert out.shape == (2, CLASSES) and np.isfinite(out).all() and np.abs(out).max() > 0.1


def test_resample_keeps_the_activation_scale(trained):
    """Token maps constant over the grid + a constant image: logits independent of size."""
    model, pretrained = trained
    flat = dict(checkpoint.flatten_params(pretrained))
    for i in range(2):
        prefix = f"MixerBlock_{i}/token_mixing/"
        k0, k1 = flat[prefix + "Dense_0/kernel"], flat[prefix + "Dense_1/kernel"]
        flat[prefix + "Dense_0/kernel"] = jnp.broadcast_to(k0[:1], k0.shape)
        flat[prefix + "Dense_1/kernel"] = jnp.broadcast_to(k1[:, :1], k1.shape)
        flat[prefix + "Dense_1/bias"] = jnp.full(16, flat[prefix + "Dense_1/bias"][0])
    constant = checkpoint.unflatten_params(flat)
    big_model, fresh = init_params(24)
    params = checkpoint.load_pretrained(constant, fresh, token_mixing="resample")
    colour = jnp.array([0.3, -0.5, 0.8])
    expected = logits(model, constant, jnp.broadcast_to(colour, (2, SIZE, SIZE, 3)))
    got = logits(big_model, params, jnp.broadcast_to(colour, (2, 24, 24, 3)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_reinit_keeps_the_models_token_mixing(npz, trained):
    _, fresh = init_params(2 * SIZE)
    params = checkpoint.load_pretrained(npz, fresh, token_mixing="reinit")
    assert_trees_equal(params["MixerBlock_1"]["token_mixing"], fresh["MixerBlock_1"]["token_mixing"])
    assert_trees_equal(params["MixerBlock_1"]["channel_mixing"],
                       trained[1]["MixerBlock_1"]["channel_mixing"])


# ------------------------------------------------------------------ mismatch messages


def abstract_params(variant, **overrides):
    model = models.create_model(variant, **overrides)
    return models.param_shapes(model, (32, 32, 3))


def test_wrong_variant_names_both_variants():
    """Shapes are checked before any value is read, so zero-stride fakes suffice here."""
    large = jax.tree.map(lambda s: np.broadcast_to(np.float32(0), s.shape),
                         abstract_params("Mixer-L_16"))
    with pytest.raises(CheckpointError) as error:
        checkpoint.load_pretrained(large, abstract_params("Mixer-B_16"))
    message = str(error.value)
    assert "This file is Mixer-L_16, the model is Mixer-B_16" in message
    assert "'stem/kernel' has shape (16, 16, 3, 1024) in the file, the model expects (16, 16, 3, 768)" in message
    assert "num_blocks 24 vs 12" in message and "hidden_dim 1024 vs 768" in message


def test_custom_width_and_block_count_mismatches(npz):
    _, narrow = init_params(SIZE, hidden_dim=32)
    with pytest.raises(CheckpointError, match=r"'stem/kernel' has shape \(4, 4, 3, 64\) in the "
                       r"file, the model expects \(4, 4, 3, 32\)\. This file is Mixer-Ti_4, the "
                       r"model is a custom Mixer \(patch_size 4, num_blocks 2, hidden_dim 32"):
        checkpoint.load_pretrained(npz, narrow)
    _, deeper = init_params(SIZE, num_blocks=3)
    with pytest.raises(CheckpointError, match=r"'MixerBlock_2/LayerNorm_0/bias' \(shape \(64,\)\) "
                       r"is missing from the file.*num_blocks 2 vs 3"):
        checkpoint.load_pretrained(npz, deeper)


@pytest.mark.parametrize("edit,message", [
    (lambda flat: flat.pop("MixerBlock_1/LayerNorm_1/bias"),
     r"has no 'MixerBlock_1/LayerNorm_1/bias' \(the model expects shape \(64,\)\)"),
    (lambda flat: flat.update({"MixerBlock_0/LayerNorm_2/scale": np.ones(64, np.float32)}),
     r"has 'MixerBlock_0/LayerNorm_2/scale' \(shape \(64,\)\), which the model does not have"),
    (lambda flat: flat.update({"MixerBlock_1/LayerNorm_0/bias": np.ones(32, np.float32)}),
     r"'MixerBlock_1/LayerNorm_0/bias': the model expects shape \(64,\), .* has \(32,\)"),
    (lambda flat: flat.update({"MixerBlock_1/token_mixing/Dense_1/bias": np.ones(9, np.float32)}),
     r"'MixerBlock_1/token_mixing/Dense_1/bias' has shape \(9,\), inconsistent"),
], ids=["missing", "extra", "reshaped", "inconsistent"])
def test_missing_extra_and_reshaped_keys_are_named(trained, edit, message):
    _, fresh = init_params(SIZE)
    flat = dict(checkpoint.flatten_params(trained[1]))
    edit(flat)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load_pretrained(checkpoint.unflatten_params(flat), fresh)


def test_token_mixing_width_mismatches_say_what_to_build(npz):
    _, wide_same_grid = init_params(SIZE, tokens_mlp_dim=64)
    with pytest.raises(CheckpointError, match=r"expects shape \(16, 64\), .* has \(16, 32\): the "
                       r"token MLP widths differ: this file is Mixer-Ti_4, the model is "
                       r"Mixer-Ti_4 with tokens_mlp_dim 64"):
        checkpoint.load_pretrained(npz, wide_same_grid)
    _, not_widened = init_params(2 * SIZE)
    with pytest.raises(CheckpointError, match=r"4x4 patch grid and the model uses 8x8; the "
                       r"block_diagonal method needs tokens_mlp_dim=128 \(the model has 32\)"):
        checkpoint.load_pretrained(npz, not_widened)
    params = checkpoint.load_pretrained(npz, not_widened, token_mixing="resample")
    assert params["MixerBlock_0"]["token_mixing"]["Dense_0"]["kernel"].shape == (64, 32)


def test_grid_errors(npz):
    _, fresh = init_params(24)
    with pytest.raises(CheckpointError, match="needs a patch grid larger by integer factors"):
        checkpoint.load_pretrained(npz, fresh, token_mixing="block_diagonal")
    _, wide = init_params((16, 32))
    with pytest.raises(CheckpointError, match="32 tokens, not a square patch grid; pass its image"):
        checkpoint.load_pretrained(npz, wide)
    with pytest.raises(CheckpointError, match=r"Image size 30x30 is not a multiple of the patch size 4"):
        checkpoint.adapted_model_overrides(npz, 30)
    with pytest.raises(ValueError, match="token_mixing must be one of"):
        checkpoint.load_pretrained(npz, fresh, token_mixing="bilinear")


def test_non_square_pretraining_grid_needs_its_image_size():
    _, wide_file = random_params((16, 32))  # 4x8 grid, 32 tokens
    _, fresh = init_params((32, 64), tokens_mlp_dim=128)
    with pytest.raises(CheckpointError, match="The file has 32 tokens, not a square patch grid"):
        checkpoint.load_pretrained(wide_file, fresh, image_size=(32, 64))
    with pytest.raises(CheckpointError, match=r"The file has 32 tokens, but an image of size "
                       r"\(32, 32\) has 8x8 = 64 patches"):
        checkpoint.load_pretrained(wide_file, fresh, image_size=(32, 64), source_image_size=(32, 32))
    params = checkpoint.load_pretrained(wide_file, fresh, image_size=(32, 64),
                                        source_image_size=(16, 32))
    assert params["MixerBlock_0"]["token_mixing"]["Dense_1"]["kernel"].shape == (128, 128)
    assert checkpoint.adapted_model_overrides(wide_file, (32, 64), source_image_size=(16, 32))[
        "tokens_mlp_dim"] == 128
