"""`python -m mixer_jax.convert`: published npz <-> orbax, exact in both directions."""
import jax
import numpy as np
import optax
import pytest
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P

from mixer_jax import checkpoint, convert, models, predict, steps, train_checkpoint


def run_cli(*argv: str) -> None:
    """Runs the command in-process, flags parsed as on the command line."""
    remaining = flags.FLAGS(["convert", *argv])
    try:
        convert.main(remaining)
    finally:
        flags.FLAGS.unparse_flags()


def random_params(seed: int = 0, num_classes: int = 10) -> dict:
    """Mixer-Ti_4 parameters with every array random (the head too, unlike a fresh init)."""
    model = models.create_model("Mixer-Ti_4", num_classes=num_classes)
    shapes = models.param_shapes(model, (16, 16, 3))
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [np.asarray(jax.random.normal(k, leaf.shape))
                                        for k, leaf in zip(keys, leaves)])


def assert_same(a, b):
    flat_a, flat_b = checkpoint.flatten_params(a), checkpoint.flatten_params(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


@pytest.mark.parametrize("scan", [False, True])
def test_npz_to_orbax_and_back_is_exact(tmp_path, scan):
    params = random_params()
    source = checkpoint.save_npz(params, str(tmp_path / "Mixer-Ti_4.npz"))
    run_cli("npz-to-orbax", f"--npz={source}", f"--out={tmp_path / 'orbax'}",
            f"--scan={str(scan).lower()}")
    stored = train_checkpoint.restore_params(str(tmp_path / "orbax"))
    assert (models.SCANNED_BLOCKS in stored) == scan  # the layout the model will restore into
    run_cli("orbax-to-npz", f"--checkpoint={tmp_path / 'orbax'}", f"--out={tmp_path / 'back.npz'}")
    assert_same(checkpoint.load_npz(str(tmp_path / "back.npz")), params)


def test_converted_npz_restores_straight_into_a_sharding(tmp_path):
    params = random_params()
    convert.npz_to_orbax(checkpoint.save_npz(params, str(tmp_path / "p.npz")), str(tmp_path / "o"))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = NamedSharding(mesh, P(None, "data"))
    kernel = params["MixerBlock_1"]["channel_mixing"]["Dense_0"]["kernel"]  # (64, 128)
    target = {"MixerBlock_1": {"channel_mixing": {"Dense_0": {
        "kernel": jax.ShapeDtypeStruct(kernel.shape, kernel.dtype, sharding=sharded)}}}}
    restored = train_checkpoint.restore_params(str(tmp_path / "o"), target)
    array = restored["MixerBlock_1"]["channel_mixing"]["Dense_0"]["kernel"]
    assert array.sharding == sharded
    assert {shard.data.shape for shard in array.addressable_shards} == {(64, 16)}
    np.testing.assert_array_equal(np.asarray(array), kernel)


def test_orbax_to_npz_exports_any_step_of_a_training_run(tmp_path):
    tx = optax.sgd(0.1, momentum=0.9)
    saved = {}
    with train_checkpoint.TrainCheckpointer(str(tmp_path), keep=5) as ckpt:
        for step in (1, 2):
            saved[step] = random_params(seed=step)
            scanned = jax.device_get(models.stack_blocks(saved[step]))  # as a scan=True run
            ckpt.save(step, steps.TrainState(step=np.int32(step), params=scanned,
                                             opt_state=tx.init(scanned),
                                             rng=np.array([0, step], np.uint32)))
    latest = convert.orbax_to_npz(str(tmp_path), str(tmp_path / "latest.npz"))
    first = convert.orbax_to_npz(str(tmp_path / "checkpoints" / "1"), str(tmp_path / "one.npz"))
    assert_same(checkpoint.load_npz(latest), saved[2])  # scanned run -> published layout
    assert_same(checkpoint.load_npz(first), saved[1])
    run_cli("orbax-to-npz", f"--checkpoint={tmp_path}", "--step=1", f"--out={tmp_path / 's.npz'}")
    assert_same(checkpoint.load_npz(str(tmp_path / "s.npz")), saved[1])
    with pytest.raises(FileNotFoundError, match=r"No checkpoint of step 3 .* \[1, 2\]"):
        convert.orbax_to_npz(str(tmp_path), str(tmp_path / "x.npz"), step=3)


@pytest.mark.slow
def test_timm_to_orbax_scan_then_predict_a_non_mixer_family(tmp_path):
    """ResMLP (any isotropic family) through the scanned layout: its timm file, written from
    a scanned model's parameters -> `timm-to-orbax --scan` (stacked, as a scan=True run
    restores them) -> `predict` (the per-block model) gives the scanned model's
    probabilities, and `orbax-to-timm` gives the parameters back exactly."""
    name, size = "resmlp_12_224", 16  # patch 16: one token; 12 blocks
    layout = models.get_family(name).block_layout
    model = models.create_model(name, num_classes=10, scan=True)
    params = jax.jit(lambda key: models.init_params(model, key, (size, size, 3)))(
        jax.random.key(0))
    rng = np.random.default_rng(0)  # away from init (layer scales 1e-4, a zero head)
    params = jax.tree.map(lambda x: np.asarray(x + rng.normal(0, 0.05, x.shape), np.float32),
                          params)
    source = checkpoint.save_timm(params, name, tmp_path / "r.safetensors", image_size=size)
    run_cli("timm-to-orbax", f"--timm={source}", f"--out={tmp_path / 'orbax'}", "--scan")
    stored = train_checkpoint.restore_params(str(tmp_path / "orbax"))
    assert layout.scanned in stored and f"{layout.prefix}0" not in stored
    assert_same(stored, params)

    loaded = predict.load_model(str(tmp_path / "orbax"))
    assert loaded.image_size == size and not loaded.model.scan
    images = rng.uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
    expected = jax.nn.softmax(jax.jit(model.apply)({"params": params}, images))
    assert np.abs(expected - 0.1).max() > 0.05  # logits far enough apart to tell models apart
    np.testing.assert_allclose(predict.probabilities(loaded, images), expected, rtol=1e-4,
                               atol=1e-6)
    run_cli("orbax-to-timm", f"--checkpoint={tmp_path / 'orbax'}",
            f"--out={tmp_path / 'back.safetensors'}")
    assert_same(checkpoint.load_timm(tmp_path / "back.safetensors"), params)


def test_clear_errors_for_bad_usage_and_missing_checkpoints(tmp_path):
    with pytest.raises(app.UsageError, match="npz-to-orbax"):
        run_cli("npz-to-tflite", f"--out={tmp_path}")
    with pytest.raises(app.UsageError, match="needs --npz"):
        run_cli("npz-to-orbax", f"--out={tmp_path}")
    with pytest.raises(FileNotFoundError, match="No orbax checkpoint found"):
        convert.orbax_to_npz(str(tmp_path), str(tmp_path / "x.npz"))
    with pytest.raises(checkpoint.CheckpointError):
        convert.npz_to_orbax(str(tmp_path / "missing.npz"), str(tmp_path / "o"))
