"""Every registered model, through the parts of the library that are not family-specific.

Parameterised over `models.list_models()` / `models.list_families()` at collection time,
so families registered later are picked up without editing this file. Per family the
work is done on a tiny model: the family's first variant with `Family.tiny` overrides
(fewer blocks, narrower; `TINY` below for families whose file predates the field), at
the smallest square image size the model takes. A family without tiny overrides runs
its first variant as is, under the `slow` mark.
"""
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import NamedSharding

from mixer_jax import models, optim, parallel, steps
from mixer_jax.models import registry

# Tiny overrides for families that do not declare `Family.tiny` themselves.
_TINY_MIXER = dict(num_blocks=2, hidden_dim=16, tokens_mlp_dim=8, channels_mlp_dim=32,
                   patch_size=4)
TINY = {"mixer": _TINY_MIXER, "gmixer": _TINY_MIXER}
NUM_CLASSES = 5
BATCH = 8
SIZES = (4, 8, 16, 28, 32, 56, 64, 112, 128, 224)  # the first that fits is used


def tiny_overrides(family) -> dict:
    return dict(family.tiny) or TINY.get(family.name, {})


# Families the generic init/apply/steps do not carry yet, and why.
NOT_GENERIC = {"randformer": "its frozen mixing matrices live in a second variable collection, "
                             "and the generic init/apply/train steps pass 'params' only"}


def family_params(slow=()):
    """One pytest param per registered family (slow when it has no tiny overrides, or is
    named in `slow`)."""
    out = []
    for name in models.list_families():
        quick = tiny_overrides(models.get_family(name)) and name not in slow
        marks = () if quick else (pytest.mark.slow,)
        if name in NOT_GENERIC:
            marks = (pytest.mark.skip(reason=NOT_GENERIC[name]),)
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@functools.cache
def tiny(family_name: str, **extra):
    """(model, image size) of the family's tiny model."""
    family = models.get_family(family_name)
    first = next(iter(family.variants))
    model = models.create_model(first, num_classes=NUM_CLASSES,
                                **{**tiny_overrides(family), **extra})
    for size in SIZES:
        try:
            models.param_shapes(model, (size, size, 3))
        except ValueError:
            continue
        return model, size
    raise AssertionError(f"No image size in {SIZES} fits {family_name}'s tiny model.")


def flat_leaves(tree, is_leaf=None) -> dict:
    return {tuple(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


@pytest.mark.slow
@pytest.mark.parametrize("name", models.list_models())
def test_every_name_builds_abstractly(name):
    family = models.get_family(name)
    model = models.create_model(name)
    size = family.preprocessing.input_size
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(
        models.param_shapes(model, (size, size, 3))))
    assert count > 0
    assert name in models.list_models(f"{name[:3]}*")


# Sequencer's LSTM scans take seconds to compile: here slow only (quick in its own file:
# the LSTM against torch, the stage shapes; its full forward pass: slow parity tests).
@pytest.mark.parametrize("family_name", family_params(slow=("sequencer",)))
def test_init_apply_and_features(family_name):
    model, size = tiny(family_name)
    images = jax.random.uniform(jax.random.key(1), (2, size, size, 3), minval=-1, maxval=1)
    params = jax.jit(lambda key: models.init_params(model, key, (size, size, 3)))(
        jax.random.key(0))
    logits, feats = jax.jit(functools.partial(model.apply, return_intermediates=True))(
        {"params": params}, images)
    assert logits.shape == (2, NUM_CLASSES) and np.isfinite(logits).all()
    assert "stem" in feats and "pre_logits" in feats
    assert any(re.fullmatch(r"(block|stage)_\d+", k) for k in feats), sorted(feats)
    headless = model.clone(num_classes=None)
    features = jax.jit(headless.apply)(
        {"params": {k: v for k, v in params.items()
                    if k not in models.get_family(family_name).classifier}}, images)
    np.testing.assert_allclose(features, feats["pre_logits"], rtol=1e-5, atol=1e-5)


def _unrolled_from_scanned(scanned: dict, unrolled_shapes: dict, layer_keys) -> dict:
    """The scanned parameters in the unrolled layout, matched by key suffix: the stacked
    leaf `.../<rest>` of block i is the i-th (natural order) unrolled leaf ending in `<rest>`
    that the scanned tree does not have."""
    flat_scanned = traverse_util.flatten_dict(scanned, sep="/")
    flat_unrolled = traverse_util.flatten_dict(unrolled_shapes, sep="/")
    only_unrolled = [k for k in flat_unrolled if k not in flat_scanned]
    natural = lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)]
    out = {k: v for k, v in flat_scanned.items() if k in flat_unrolled}
    for key in layer_keys:
        stacked = flat_scanned[key]
        parts = key.split("/")
        for start in range(1, len(parts)):
            rest = "/".join(parts[start:])
            matches = sorted((k for k in only_unrolled if k.endswith("/" + rest)
                              and flat_unrolled[k].shape == stacked.shape[1:]), key=natural)
            if len(matches) == stacked.shape[0]:
                out.update({k: stacked[i] for i, k in enumerate(matches)})
                break
        else:
            raise AssertionError(f"No unrolled parameters match the scanned {key!r}.")
    assert set(out) == set(flat_unrolled)
    return traverse_util.unflatten_dict(out, sep="/")


@pytest.mark.parametrize("family_name", family_params())
def test_scan_equals_unrolled(family_name):
    family = models.get_family(family_name)
    if "scan" not in registry.model_fields(family):
        pytest.skip(f"{family_name} has no scanned layout")
    model, size = tiny(family_name)
    scanned_model = model.clone(scan=True)
    scanned = jax.jit(lambda key: models.init_params(scanned_model, key, (size, size, 3)))(
        jax.random.key(0))
    axes = flat_leaves(models.param_axes(scanned_model, (size, size, 3)),
                       is_leaf=lambda x: isinstance(x, tuple))
    layer_keys = ["/".join(k) for k, a in axes.items() if "layers" in a]
    assert layer_keys, "a scanned model declares its stacked axis as 'layers'"
    # a random head, so that the logits depend on everything before it
    rng = np.random.default_rng(0)
    scanned = jax.tree.map(lambda x: x + rng.normal(0, 0.1, x.shape).astype(x.dtype), scanned)
    unrolled = _unrolled_from_scanned(
        scanned, models.param_shapes(model, (size, size, 3)), layer_keys)
    images = jax.random.uniform(jax.random.key(1), (2, size, size, 3), minval=-1, maxval=1)
    np.testing.assert_allclose(jax.jit(scanned_model.apply)({"params": scanned}, images),
                               jax.jit(model.apply)({"params": unrolled}, images),
                               rtol=1e-5, atol=1e-5)


MESHES = {"data": (8, 1, False), "fsdp": (8, 1, True), "fsdp_data_x_model": (4, 2, True)}


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("family_name", family_params())
def test_partition_specs_are_valid_on_8_devices(family_name, mesh_name):
    data, model_size, fsdp = MESHES[mesh_name]
    mesh = parallel.make_mesh(model_size)
    for scan in (False, True):
        model, size = tiny(family_name)
        if scan and "scan" not in registry.model_fields(models.get_family(family_name)):
            continue
        model = model.clone(scan=scan) if scan else model
        shape = (4 * size, 4 * size, 3)  # 16x the tokens of the smallest size: some divide 8
        shapes = flat_leaves(models.param_shapes(model, shape))
        axes = flat_leaves(models.param_axes(model, shape), is_leaf=lambda x: isinstance(x, tuple))
        assert set(shapes) == set(axes)
        for key, leaf in shapes.items():
            names = axes[key]
            assert len(names) == len(leaf.shape), key
            assert set(names) <= set(registry.AXES), (key, names)  # every axis named
            spec = parallel.partition_spec(names, leaf.shape, data_size=data,
                                           model_size=model_size, fsdp=fsdp, fsdp_min_size=0)
            used = [a for a in spec if a is not None]
            assert len(used) == len(set(used)), (key, spec)
            for dim, (axis, size_) in enumerate(zip(tuple(spec), leaf.shape)):
                if axis is not None:
                    assert size_ % mesh.shape[axis] == 0, (key, spec)
                    assert names[dim] not in ("tokens", "layers", "kernel", "channels"), key
            NamedSharding(mesh, spec).shard_shape(leaf.shape)  # a valid sharding


def _config(parallelism):
    import ml_collections

    return ml_collections.ConfigDict(dict(
        optim="sgd", momentum=0.9, base_lr=0.1, total_steps=10, warmup_steps=0,
        decay_type="constant", grad_norm_clip=1.0, batch=BATCH, accum_steps=1,
        parallelism=parallelism, mesh_model=1, fsdp_min_size=0, pp=dict(crop=0)))


@pytest.mark.slow
@pytest.mark.parametrize("family_name", family_params())
def test_one_fsdp_step_on_8_devices_equals_one_device(family_name):
    model, size = tiny(family_name)
    config = _config("fsdp")
    config.pp.crop = size
    tx = optim.make_optimizer(config)[0]
    init = functools.partial(steps.init_state, model, tx, image_shape=(size, size, 3))
    state = jax.device_get(jax.jit(init)(jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)  # every parameter non-trivial (zero-initialised heads too)
    state = state.replace(params=jax.tree.map(
        lambda x: (x + rng.normal(0, 0.2, x.shape)).astype(x.dtype), state.params))
    batch = {"image": rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32),
             "label": np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, BATCH)]}
    expected, metrics = jax.jit(functools.partial(steps.train_step, model=model, tx=tx))(
        state, batch)
    strategy = parallel.make_strategy(config, model, tx)
    assert isinstance(strategy, parallel.MeshStrategy) and strategy.fsdp
    sharded = [x for x in jax.tree.leaves(strategy.abstract_state().params)
               if any(a is not None for a in x.sharding.spec)]
    assert sharded, "FSDP splits at least one parameter of the tiny model"
    got, got_metrics = strategy.train_step(strategy.place(state), strategy.put_batch(batch))
    np.testing.assert_allclose(got_metrics["loss"], metrics["loss"], rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
                 jax.device_get(strategy.to_saveable(got).params), jax.device_get(expected.params))


def test_new_families_are_picked_up(monkeypatch):
    """A family registered later appears in the parameterisation (collection-time lists)."""
    fam = registry.Family(name="zzz_test", module=models.MlpMixer,
                          variants={"zzz_tiny": dict(models.VARIANTS["Mixer-Ti_4"])},
                          architecture=lambda flat: {}, tiny={"num_blocks": 1})
    monkeypatch.setitem(registry._FAMILIES, fam.name, fam)
    monkeypatch.setitem(registry._BY_MODEL, "zzz_tiny", fam)
    assert "zzz_tiny" in models.list_models()
    assert [p.values[0] for p in family_params()][-1] == "zzz_test"
    assert tiny_overrides(fam) == {"num_blocks": 1}
    _ = nn, jnp  # (imported for families' tiny overrides that name dtypes)


def test_config_validation_asks_the_registry():
    from mixer_jax import train_config
    from mixer_jax.errors import ConfigError

    config = train_config.base_config()
    config.model_name, config.pp.crop = "Mixer-Ti_4", 16
    train_config.validate(config)
    config.model_name = "Mixer-X_9"
    with pytest.raises(ConfigError, match="model_name 'Mixer-X_9' is not a registered model"):
        train_config.validate(config)
    config.model_name = "Mixer-Ti_4"
    config.model.depthz = 3
    with pytest.raises(ConfigError, match=r"unknown model option\(s\) \['depthz'\] for Mixer-Ti_4"):
        train_config.validate(config)
    del config.model["depthz"]
    config.pp.crop, config.pp.std = 18, (0.5, 0.5, 0.0)
    with pytest.raises(ConfigError, match=r"pp.crop=18 does not fit Mixer-Ti_4.*\n.*pp.std must"):
        train_config.validate(config)
    # The base config suits staged families, which have no `scan` field (unset by default).
    config.pp.std = None
    config.model_name, config.pp.crop = "poolformer_s12", 16
    config.model.update(tiny_overrides(models.get_family("poolformer_s12")))
    train_config.validate(config)
    config.model.scan = True
    with pytest.raises(ConfigError, match=r"unknown model option\(s\) \['scan'\] for poolformer"):
        train_config.validate(config)
