"""Every registered model, through the parts of the library that are not family-specific.

Parameterised over `models.list_models()` / `models.list_families()` at collection time,
so families registered later are picked up without editing this file. Per family the
work is done on a tiny model: the family's first variant with `Family.tiny` overrides
(fewer blocks, narrower; `TINY` below for families whose file predates the field), at
the smallest square image size the model takes. A family without tiny overrides runs
its first variant as is, under the `slow` mark. Per family: init/apply and features,
scanned == unrolled and the scanned layout through the per-block one (isotropic
families), partition specs, bfloat16 compute and parameters, and one train step under
FSDP and under pmap equal to one device (compiled programs and parameters are shared
between the tests through `functools.cache`).
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

from mixer_jax import checkpoint, finetune, models, optim, parallel, steps
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


def family_params(slow=()):
    """One pytest param per registered family (slow when it has no tiny overrides, or is
    named in `slow`)."""
    out = []
    for name in models.list_families():
        quick = tiny_overrides(models.get_family(name)) and name not in slow
        marks = () if quick else (pytest.mark.slow,)
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


def perturbed(tree, seed: int = 0, scale: float = 0.2):
    """`tree` (numpy) plus noise: every parameter non-trivial (zero-initialised heads too)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (x + rng.normal(0, scale, x.shape)).astype(x.dtype), tree)


@functools.cache
def tiny_variables(family_name: str, **extra) -> dict:
    """Initialised variables of `tiny(family_name, **extra)`, the parameters perturbed, the
    constants (RandFormer's frozen matrices) as drawn (host arrays)."""
    model, size = tiny(family_name, **extra)
    variables = jax.jit(lambda key: models.init_variables(model, key, (size, size, 3)))(
        jax.random.key(0))
    params, constants = models.split_variables(jax.device_get(variables))
    return models.as_variables(perturbed(params), constants)


def tiny_params(family_name: str, **extra) -> dict:
    return tiny_variables(family_name, **extra)["params"]


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
    params, constants = models.split_variables(tiny_variables(family_name))
    logits, feats = jax.jit(functools.partial(model.apply, return_intermediates=True))(
        models.as_variables(params, constants), images)
    assert logits.shape == (2, NUM_CLASSES) and np.isfinite(logits).all()
    assert "stem" in feats and "pre_logits" in feats
    assert any(re.fullmatch(r"(block|stage)_\d+", k) for k in feats), sorted(feats)
    headless = model.clone(num_classes=None)
    features = jax.jit(headless.apply)(models.as_variables(
        {k: v for k, v in params.items() if k not in models.get_family(family_name).classifier},
        constants), images)
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


@functools.cache
def jitted_apply(model: nn.Module):
    """`model.apply` jitted once per session (several tests run the same tiny models)."""
    return jax.jit(model.apply)


def scanned_family_params():
    """The params of `family_params` whose family has a scanned layout."""
    return [p for p in family_params() if models.get_family(p.values[0]).block_layout]


@pytest.mark.parametrize("family_name", scanned_family_params())
def test_scan_equals_unrolled(family_name):
    model, size = tiny(family_name)
    scanned_model = tiny(family_name, scan=True)[0]
    scanned = tiny_params(family_name, scan=True)  # random head: the logits see every block
    axes = flat_leaves(models.param_axes(scanned_model, (size, size, 3)),
                       is_leaf=lambda x: isinstance(x, tuple))
    layer_keys = ["/".join(k) for k, a in axes.items() if "layers" in a]
    assert layer_keys, "a scanned model declares its stacked axis as 'layers'"
    unrolled = _unrolled_from_scanned(
        scanned, models.param_shapes(model, (size, size, 3)), layer_keys)
    images = jax.random.uniform(jax.random.key(1), (2, size, size, 3), minval=-1, maxval=1)
    np.testing.assert_allclose(jitted_apply(scanned_model)({"params": scanned}, images),
                               jitted_apply(model)({"params": unrolled}, images),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family_name", scanned_family_params())
def test_scanned_params_load_back_through_the_per_block_layout(family_name):
    """A scanned model's parameters -> the per-block layout files hold (`flatten_params`,
    then timm's keys and back) -> `load_pretrained` into a scanned and an unrolled model:
    the logits of the original."""
    family = models.get_family(family_name)
    model, size = tiny(family_name)
    scanned_model = tiny(family_name, scan=True)[0]
    scanned = tiny_params(family_name, scan=True)
    assert family.block_layout.scanned in scanned
    images = jax.random.uniform(jax.random.key(1), (2, size, size, 3), minval=-1, maxval=1)
    expected = jitted_apply(scanned_model)({"params": scanned}, images)
    flat = checkpoint.flatten_params(scanned)
    per_block = flat_leaves(models.param_shapes(model, (size, size, 3)))
    assert {k: v.shape for k, v in flat.items()} == {
        "/".join(k): v.shape for k, v in per_block.items()}
    sources = {"flat": flat}
    if family.to_timm:
        sources["timm"] = family.from_timm(family.to_timm(flat))
    for target in (model, scanned_model):
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                             models.param_shapes(target, (size, size, 3)))
        for name, source in sources.items():
            loaded = finetune.load_pretrained(source, zeros, reset_head=False)
            assert jax.tree.structure(loaded) == jax.tree.structure(zeros), name
            np.testing.assert_allclose(jitted_apply(target)({"params": loaded}, images), expected,
                                       rtol=1e-5, atol=1e-5, err_msg=f"{name} -> {target.scan}")


def test_only_isotropic_families_have_a_scanned_layout():
    from mixer_jax import train_config
    from mixer_jax.errors import ConfigError

    staged = []
    for name in models.list_families():
        family = models.get_family(name)
        first = next(iter(family.variants))
        models.create_model(first, scan=False)  # every family builds unrolled
        if "scan" in registry.model_fields(family):
            assert family.block_layout is not None, name
            continue
        assert family.block_layout is None, name
        staged.append(first)
        with pytest.raises(registry.ScanError, match=f"{name} has no scanned layout"):
            models.create_model(first, scan=True)
        with pytest.raises(registry.ScanError, match="without --scan"):
            family.scanned({"stem": {}})
    config = train_config.base_config()  # model.scan=False: fine for a staged family
    config.model_name, config.pp.crop = staged[0], 0  # (a bad crop: no model is built)
    with pytest.raises(ConfigError) as error:
        train_config.validate(config)
    assert "scan" not in str(error.value) and "pp.crop=0" in str(error.value)
    config.model.scan = True
    with pytest.raises(ConfigError, match="model.scan=True: .* has no scanned layout"):
        train_config.validate(config)
    with pytest.raises(ValueError, match="needs a `block_layout`"):
        registry.register(registry.Family(name="zzz_unlaid", module=models.MlpMixer,
                                          variants={}, architecture=lambda flat: {}))
    assert "zzz_unlaid" not in models.list_families()


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


@functools.cache
def one_device_step(family_name: str):
    """(model, tx, host state, batch, state after one train step on one device, its metrics)."""
    model, size = tiny(family_name)
    tx = optim.make_optimizer(_config("fsdp"))[0]
    init = functools.partial(steps.init_state, model, tx, image_shape=(size, size, 3))
    state = jax.device_get(jax.jit(init)(jax.random.PRNGKey(0)))
    state = state.replace(params=perturbed(state.params))
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32),
             "label": np.eye(NUM_CLASSES, dtype=np.float32)[rng.integers(0, NUM_CLASSES, BATCH)]}
    expected, metrics = jax.jit(functools.partial(steps.train_step, model=model, tx=tx))(
        state, batch)
    return model, tx, state, batch, jax.device_get(expected), jax.device_get(metrics)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["fsdp", "pmap"])
@pytest.mark.parametrize("family_name", family_params())
def test_one_train_step_on_8_devices_equals_one_device(family_name, parallelism):
    model, tx, state, batch, expected, metrics = one_device_step(family_name)
    config = _config(parallelism)
    config.pp.crop = tiny(family_name)[1]
    strategy = parallel.make_strategy(config, model, tx)
    if parallelism == "pmap":  # a full copy of the state on each device, one example each
        assert isinstance(strategy, parallel.PmapStrategy) and len(strategy.devices) == 8
    else:
        assert isinstance(strategy, parallel.MeshStrategy) and strategy.fsdp
        sharded = [x for x in jax.tree.leaves(strategy.abstract_state().params)
                   if any(a is not None for a in x.sharding.spec)]
        assert sharded, "FSDP splits at least one parameter of the tiny model"
    got, got_metrics = strategy.train_step(strategy.place(state), strategy.put_batch(batch))
    np.testing.assert_allclose(got_metrics["loss"], metrics["loss"], rtol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
                 jax.device_get(strategy.to_saveable(got).params), expected.params)


# bfloat16 keeps 8 significant bits (relative spacing 2**-8); a few tiny blocks compound it
# (measured: 0.004 gMLP to 0.03 ConvFormer, relative L2 error of the logits).
BF16_RTOL = 0.05


@pytest.mark.slow
@pytest.mark.parametrize("family_name", family_params())
def test_bfloat16_compute_and_parameters(family_name):
    """dtype=bfloat16 computes in bfloat16 (every intermediate and the logits) on float32
    parameters, within bfloat16's precision of float32's logits; param_dtype=bfloat16
    makes bfloat16 parameters, and a fully bfloat16 model is as close."""
    model, size = tiny(family_name)
    shape = (size, size, 3)
    low = model.clone(dtype=jnp.bfloat16)
    full = model.clone(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    dtypes = lambda m: {x.dtype for x in jax.tree.leaves(models.param_shapes(m, shape))}
    assert dtypes(low) == {jnp.dtype(jnp.float32)}
    assert dtypes(full) == {jnp.dtype(jnp.bfloat16)}
    params, constants = models.split_variables(tiny_variables(family_name))
    images = np.random.default_rng(2).uniform(-1, 1, (4, *shape)).astype(np.float32)

    @jax.jit
    def logits(p, x):
        bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
        return (model.apply(models.as_variables(p, constants), x),
                low.apply(models.as_variables(p, constants), x, return_intermediates=True),
                full.apply(models.as_variables(bf16, constants), x))

    reference, (got, feats), got_full = logits(params, images)
    assert reference.dtype == jnp.float32
    assert {k: v.dtype for k, v in feats.items()} == dict.fromkeys(feats, jnp.bfloat16)
    for out in (got, got_full):
        assert out.dtype == jnp.bfloat16
        error = np.linalg.norm(np.asarray(out, np.float32) - reference)
        assert error / np.linalg.norm(reference) < BF16_RTOL


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
