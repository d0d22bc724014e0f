"""Parallel strategies (mixer_jax.parallel) on 8 simulated CPU devices."""
import functools
import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mixer_jax import models, parallel, steps
from tiny_training import (
    BATCH, reference_run, reference_setup, synthetic_batch, tiny_config, tiny_model,
)

CHANNEL_DENSE_0 = ("MixerBlock_0", "channel_mixing", "Dense_0", "kernel")  # (64, 128)
TOKEN_DENSE_1 = ("MixerBlock_1", "token_mixing", "Dense_1", "kernel")  # (32, 16), 512 elements
STEM = ("stem", "kernel")  # (4, 4, 3, 64)

# name -> (config overrides, expected per-device shard shapes of three params)
CASES = {
    "pmap": (dict(parallelism="pmap"), None),
    "data": (dict(parallelism="data"),
             {CHANNEL_DENSE_0: (64, 128), TOKEN_DENSE_1: (32, 16), STEM: (4, 4, 3, 64)}),
    "fsdp": (dict(parallelism="fsdp"),
             {CHANNEL_DENSE_0: (64, 16), TOKEN_DENSE_1: (32, 16), STEM: (4, 4, 3, 8)}),
    "fsdp_4x2_accum2": (dict(parallelism="fsdp", mesh_model=2, accum_steps=2),
                        {CHANNEL_DENSE_0: (16, 64), TOKEN_DENSE_1: (16, 16), STEM: (4, 4, 3, 16)}),
}


@functools.cache
def strategy_for(name: str) -> parallel.Strategy:
    model, tx, _ = reference_setup()
    return parallel.make_strategy(tiny_config(**CASES[name][0]), model, tx)


def get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def assert_trees_close(actual, expected, **tol):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(functools.partial(np.testing.assert_allclose, **tol), actual, expected)


@pytest.mark.parametrize("name", CASES)
def test_training_matches_single_device(name):
    strategy = strategy_for(name)
    _, _, host = reference_setup()
    batches = [synthetic_batch(1), synthetic_batch(2)]
    expected, expected_losses = reference_run(batches)

    state = strategy.place(host)
    assert_trees_close(jax.device_get(strategy.to_saveable(state)), host, rtol=0, atol=0)
    for batch, loss in zip(batches, expected_losses):
        state, metrics = strategy.train_step(state, strategy.put_batch(batch))
        np.testing.assert_allclose(jax.device_get(metrics["loss"]), loss, rtol=1e-5)
    got = jax.device_get(strategy.to_saveable(state))
    assert int(got.step) == 2
    assert_trees_close(got.params, expected.params, rtol=1e-5, atol=1e-6)
    assert_trees_close(got.opt_state, expected.opt_state, rtol=1e-5, atol=1e-6)

    shard_shapes = CASES[name][1]
    if shard_shapes is None:  # pmap: a full copy on each of the 8 devices
        assert get(state.params, CHANNEL_DENSE_0).shape == (8, 64, 128)
        return
    momentum = state.opt_state[1][0].trace
    for path, shape in shard_shapes.items():
        for tree in (state.params, momentum):  # optimizer state sharded like params
            shards = get(tree, path).addressable_shards
            assert len(shards) == 8 and {s.data.shape for s in shards} == {shape}, path


@pytest.mark.parametrize("name", ["pmap", "fsdp_4x2_accum2"])
def test_init_creates_state_in_its_sharding(name):
    strategy = strategy_for(name)
    state = strategy.init(jax.random.PRNGKey(0))
    _, _, host = reference_setup()  # same key; only the head kernel was randomised
    saved = jax.device_get(strategy.to_saveable(state))
    np.testing.assert_array_equal(get(saved.params, ("head", "kernel")), 0)
    saved.params["head"]["kernel"] = host.params["head"]["kernel"]
    assert_trees_close(saved, host, rtol=1e-6, atol=1e-7)
    if name != "pmap":
        abstract = strategy.abstract_state()
        for leaf, spec in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
            assert leaf.sharding == spec.sharding
        assert get(state.params, CHANNEL_DENSE_0).sharding.spec == P(
            parallel.DATA_AXIS, parallel.MODEL_AXIS)


@pytest.mark.parametrize("name", ["pmap", "fsdp_4x2_accum2"])
def test_eval_matches_single_device(name):
    strategy = strategy_for(name)
    model, _, host = reference_setup()
    batch = synthetic_batch(5)
    batch["mask"] = (np.arange(BATCH) < 11).astype(np.float32)
    expected = jax.jit(functools.partial(steps.eval_step, model=model))(host.variables, batch)
    state = strategy.place(host)
    sums = jax.device_get(strategy.eval_step(strategy.variables_of(state), strategy.put_batch(batch)))
    assert sums["count"] == 11
    for key in expected:
        np.testing.assert_allclose(sums[key], expected[key], rtol=1e-5, err_msg=key)


def test_partition_rules_on_published_shapes():
    spec = functools.partial(parallel.partition_spec, fsdp_min_size=0)
    # Mixer-B/16's logical axes (models.param_axes): token MLP Dense_0 kernel/bias,
    # channel MLP Dense_1 kernel, stem and head kernels.
    tok0, tok0b, ch1 = ("tokens", "mlp"), ("mlp",), ("mlp", "embed")
    stem, head = ("kernel", "kernel", "channels", "embed"), ("embed", "classes")
    # FSDP: the largest dimension that divides the data axis
    assert spec(stem, (16, 16, 3, 768), data_size=8, fsdp=True) == P(None, None, None, "data")
    assert spec(tok0, (196, 384), data_size=8, fsdp=True) == P(None, "data")
    assert spec(head, (768, 21843), data_size=8, fsdp=True) == P("data", None)
    # model axis: the MLP hidden dim (Dense_0 output, Dense_1 input), FSDP on what is left
    # ... but never the token axis of token-mixing weights (see the H/14 test)
    assert spec(tok0, (196, 384), data_size=4, model_size=2, fsdp=True) == P(None, "model")
    assert spec(tok0b, (384,), data_size=4, model_size=2) == P("model")
    assert spec(ch1, (3072, 768), data_size=4, model_size=2, fsdp=True) == P("model", "data")
    assert spec(ch1, (3072, 768), data_size=4, model_size=2, fsdp=False) == P("model", None)
    assert spec(head, (768, 1000), data_size=4, model_size=2) == P(None, None)
    # optimizer state follows the axes of the parameter whose path ends its path
    param_axes = {("MixerBlock_3", "channel_mixing", "Dense_1", "kernel"): ch1}
    names = ("opt_state", "1", "0", "trace", "MixerBlock_3", "channel_mixing", "Dense_1", "kernel")
    assert parallel.leaf_axes(param_axes, names, 2) == ch1
    assert parallel.leaf_axes(param_axes, ("opt_state", "0", "count"), 0) == ()
    assert spec(parallel.leaf_axes(param_axes, names, 2), (3072, 768), data_size=4,
                model_size=2) == P("model", None)
    # what does not divide stays replicated, without error
    assert spec(tok0, (196, 384), data_size=5, model_size=5, fsdp=True) == P(None, None)
    # small arrays stay replicated under FSDP
    assert parallel.partition_spec(tok0b, (384,), data_size=8, fsdp=True) == P(None)
    # scanned layout: the leading block axis ("layers") is never split
    assert spec(("layers", "embed"), (12, 196), data_size=12, fsdp=True) == P(None, None)
    assert spec(("layers", "embed", "mlp"), (12, 768, 3072), data_size=4, model_size=2,
                fsdp=True) == P(None, "data", "model")
    with pytest.raises(ValueError, match="axis names"):
        spec(tok0, (196, 384, 1), data_size=8)


def _specs(model, image_size, **kw):
    """{parameter path: (shape, PartitionSpec)} of `model` from its logical axes."""
    shapes = models.param_shapes(model, (image_size, image_size, 3))
    axes = models.param_axes(model, (image_size, image_size, 3))
    flat_axes = dict(jax.tree_util.tree_leaves_with_path(
        axes, is_leaf=lambda x: isinstance(x, tuple)))
    return {tuple(k.key for k in path): (leaf.shape, parallel.partition_spec(
        flat_axes[path], leaf.shape, fsdp_min_size=0, **kw))
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_fsdp_never_splits_the_token_axis_of_h14_on_256_devices(scan):
    # H/14 at 224 has S = 256 patches: the only dimension of its token-mixing kernels
    # (256 x 640) that 256 divides. Splitting it made XLA split images spatially and
    # replicate the batch (2.4 TiB of temporaries per device), so they stay replicated.
    model = models.create_model("Mixer-H_14", scan=scan)
    specs = _specs(model, 224, data_size=256, fsdp=True)
    block = (models.SCANNED_BLOCKS, "block") if scan else ("MixerBlock_7",)
    lead = (32,) if scan else ()
    token, channel = block + ("token_mixing",), block + ("channel_mixing",)
    none = (None,) * len(lead)
    assert specs[token + ("Dense_0", "kernel")] == (lead + (256, 640), P(*none, None, None))
    assert specs[token + ("Dense_1", "kernel")] == (lead + (640, 256), P(*none, None, None))
    assert specs[token + ("Dense_1", "bias")] == (lead + (256,), P(*none, None))
    # Every other dimension that divides still is split: the channel MLP's hidden dim,
    # and the token MLP's when it divides (640 on 128 devices).
    assert specs[channel + ("Dense_0", "kernel")] == (lead + (1280, 5120), P(*none, None, "data"))
    assert specs[channel + ("Dense_1", "kernel")] == (lead + (5120, 1280), P(*none, "data", None))
    assert _specs(model, 224, data_size=128, fsdp=True)[token + ("Dense_0", "kernel")] == (
        lead + (256, 640), P(*none, None, "data"))
    # No leaf anywhere has its token axis split.
    for names, (shape, spec) in specs.items():
        if "token_mixing" in names and names[-2:] != ("Dense_0", "bias"):
            token_axis = -2 if names[-2:] == ("Dense_0", "kernel") else -1
            assert tuple(spec)[len(shape) + token_axis] is None, names


def test_lower_train_step_plans_memory_from_shapes():
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in synthetic_batch(0).items()}
    batch_bytes = sum(v.size * v.dtype.itemsize for v in batch.values()) // 8
    state_bytes = {}
    for name in ("data", "fsdp"):
        strategy = strategy_for(name)
        analysis = strategy.lower_train_step(batch).compile().memory_analysis()
        state_bytes[name] = sum(
            math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(strategy.abstract_state()))
        # The compiled step takes exactly this device's shard of the state and batch.
        assert analysis.argument_size_in_bytes == state_bytes[name] + batch_bytes
    assert state_bytes["fsdp"] < state_bytes["data"] / 2


def test_scanned_layout_sharding():
    _, tx, _ = reference_setup()
    strategy = parallel.make_strategy(
        tiny_config(parallelism="fsdp", mesh_model=2), tiny_model(scan=True), tx)
    abstract = strategy.abstract_state()
    kernel = abstract.params[models.SCANNED_BLOCKS]["block"]["channel_mixing"]["Dense_0"]["kernel"]
    assert kernel.shape == (2, 64, 128)
    assert kernel.sharding.spec == P(None, "data", "model")
    assert kernel.sharding.shard_shape(kernel.shape) == (2, 16, 64)
    assert abstract.rng.sharding.spec == P() and abstract.step.sharding.spec == P()


def test_place_rejects_a_state_of_another_model():
    strategy = strategy_for("fsdp")
    _, _, host = reference_setup()
    scanned = host.replace(params=models.stack_blocks(host.params))
    with pytest.raises(ValueError, match="structure"):
        strategy.place(scanned)
    params = jax.tree.map(np.copy, host.params)
    params["head"]["kernel"] = np.zeros((64, 7), np.float32)
    with pytest.raises(ValueError, match=r"head.*\(64, 7\)"):
        strategy.with_params(strategy.place(host), params)


def test_with_params_replaces_params_in_their_sharding():
    strategy = strategy_for("fsdp_4x2_accum2")
    _, _, host = reference_setup()
    state = strategy.place(host)
    params = jax.tree.map(lambda x: np.full_like(x, 0.5), host.params)
    state = strategy.with_params(state, params)
    kernel = get(state.params, CHANNEL_DENSE_0)
    assert kernel.sharding.spec == P("data", "model")
    np.testing.assert_array_equal(jax.device_get(kernel), 0.5)
    assert int(state.step) == 0


@pytest.mark.parametrize("name,global_shape,shard_shape", [
    ("pmap", (8, 2, 16, 16, 3), (1, 2, 16, 16, 3)),
    ("fsdp_4x2_accum2", (16, 16, 16, 3), (4, 16, 16, 3)),
])
def test_put_batch_layout(name, global_shape, shard_shape):
    strategy = strategy_for(name)
    batch = strategy.put_batch(synthetic_batch(0))
    image = batch["image"]
    assert image.shape == global_shape
    assert {s.data.shape for s in image.addressable_shards} == {shard_shape}
    np.testing.assert_array_equal(
        np.asarray(image).reshape(16, 16, 16, 3), synthetic_batch(0)["image"])


def test_put_batch_rejects_uneven_batches():
    with pytest.raises(ValueError, match="12 examples"):
        strategy_for("pmap").put_batch({"image": np.zeros((12, 16, 16, 3), np.float32)})
    with pytest.raises(ValueError, match="6 examples"):
        strategy_for("fsdp_4x2_accum2").put_batch({"label": np.zeros((6, 10), np.float32)})


def test_prefetch_transfers_ahead_in_order():
    strategy = strategy_for("data")
    consumed = []

    def host_batches():
        for i in range(5):
            consumed.append(i)
            yield {"label": np.full((BATCH, 10), i, np.float32)}

    device_batches = strategy.prefetch(host_batches(), size=2)
    first = next(device_batches)
    assert consumed == [0, 1]  # one ahead of the one in use
    values = [float(first["label"][0, 0])] + [float(b["label"][0, 0]) for b in device_batches]
    assert values == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("overrides,match", [
    (dict(parallelism="tensor"), "parallelism"),
    (dict(batch=12), "batch=12"),
    (dict(accum_steps=4), "accum_steps=4"),  # 16 examples < 8 devices x 4 micro-batches
    (dict(mesh_model=3), "mesh_model=3"),
    (dict(parallelism="pmap", mesh_model=2), "pmap"),
    (dict(batch_eval=20), "batch_eval"),
])
def test_make_strategy_rejects_bad_config(overrides, match):
    model, tx, _ = reference_setup()
    with pytest.raises(ValueError, match=match):
        parallel.make_strategy(tiny_config(**overrides), model, tx)


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}, None),
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-4]"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "ompi"),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, "tpu"),
])
def test_detect_cluster(env, expected):
    assert parallel.detect_cluster(env) == expected


def test_single_process_does_not_initialize_distributed():
    assert not parallel.maybe_initialize_distributed(environ={})
    assert not parallel.maybe_initialize_distributed(environ={"JAX_NUM_PROCESSES": "1"})
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1
