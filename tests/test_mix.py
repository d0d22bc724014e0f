"""Mixed-sample augmentation (mixer_jax.mix): masks, labels, determinism, devices, timm."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mixer_jax import mix, parallel, steps, train_config
from mixer_jax.errors import ConfigError

import tiny_training as tt

MASK_METHODS = tuple(m for m in mix.METHODS if m != "mixup")
PATCH = 4
COLLECTIVE = re.compile(r"all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter")


def batch(size=8, side=16, seed=0):
    rs = np.random.RandomState(seed)
    images = rs.uniform(-1, 1, (size, side, side, 3)).astype(np.float32)
    labels = np.eye(10, dtype=np.float32)[rs.randint(0, 10, size)]
    return jnp.asarray(images), jnp.asarray(labels)


@functools.cache
def jitted_mix(cfg):
    return jax.jit(functools.partial(mix.mix, cfg=cfg, patch_size=PATCH))


@functools.cache
def every_method(modes=("elem",)):
    """One program mixing a batch with each mask method alone, in each of `modes`."""
    def run(images, labels, key):
        return {(m, mode): mix.mix(images, labels, key,
                                   mix.alone(m, mode=mode, label_smoothing=0.1), PATCH)
                for m in MASK_METHODS for mode in modes}
    return jax.jit(run)


def check_lambda_and_labels(labels, soft, lam, mask):
    mask, lam = np.asarray(mask), np.asarray(lam)
    assert set(np.unique(mask)) <= {0.0, 1.0} and (mask == 0).any()  # binary, and it mixed
    np.testing.assert_array_equal(lam, mask.mean(axis=(1, 2), dtype=np.float64).astype(np.float32))
    smooth = np.asarray(labels) * 0.9 + 0.01
    want = lam[:, None] * smooth + (1 - lam[:, None]) * smooth[::-1]
    np.testing.assert_allclose(soft, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(soft).sum(-1), 1, rtol=1e-6)


def test_mask_methods_lambda_is_the_mask_mean_and_labels_its_blend():
    images, labels = batch()
    results = every_method()(images, labels, jax.random.PRNGKey(3))
    for (method, _), (_, soft, lam, mask) in results.items():
        check_lambda_and_labels(labels, soft, lam, mask)
        assert len({m.tobytes() for m in np.asarray(mask)}) > 1, method  # one mask per example


@pytest.mark.slow
def test_batch_mode_draws_once_and_pair_mode_once_per_pair():
    images, labels = batch()
    results = every_method(("batch", "pair"))(images, labels, jax.random.PRNGKey(4))
    for (method, mode), (_, soft, lam, mask) in results.items():
        check_lambda_and_labels(labels, soft, lam, mask)
        mask = np.asarray(mask)
        if method == "saliencymix":  # its box follows each partner's saliency peak
            assert len({m.tobytes() for m in mask}) > 1
        elif mode == "batch":
            assert (mask == mask[:1]).all(), method
        else:
            np.testing.assert_array_equal(mask, mask[::-1], err_msg=method)
            assert len({m.tobytes() for m in mask}) > 1, method


def test_each_pixel_comes_from_the_image_its_mask_names():
    images, labels = batch()
    results = every_method()(images, labels, jax.random.PRNGKey(5))
    ours, partners = np.asarray(images), np.asarray(images)[::-1]
    for (method, _), (mixed, _, _, mask) in results.items():
        mixed, mask = np.asarray(mixed), np.asarray(mask)[..., None]
        np.testing.assert_array_equal(np.where(mask == 1, mixed, 0), np.where(mask == 1, ours, 0))
        if method != "resizemix":
            np.testing.assert_array_equal(np.where(mask == 0, mixed, 0),
                                          np.where(mask == 0, partners, 0), err_msg=method)
            continue
        for i in range(len(mixed)):  # ResizeMix pastes the whole partner, shrunk into the box
            rows, cols = np.nonzero(mask[i, ..., 0] == 0)
            if rows.size == 0:
                continue
            box = mixed[i, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.size == rows.size * 3  # a full rectangle
            shrunk = jax.image.resize(partners[i], box.shape, "linear", antialias=True)
            np.testing.assert_allclose(box, shrunk, atol=1e-5)


def test_same_key_same_batch_other_key_other_batch():
    images, labels = batch()
    first, again, other = (every_method()(images, labels, jax.random.PRNGKey(k))
                           for k in (7, 7, 8))
    for key in first:
        for a, b in zip(first[key], again[key]):
            np.testing.assert_array_equal(a, b)
        assert not np.array_equal(first[key][0], other[key][0])


def test_lambda_one_leaves_the_image_unchanged():
    images, _ = batch(size=2)

    @jax.jit
    def masks(key):
        return {m: mix.method_mask(m, mix.alone(m), PATCH, key, 1.0, images[0], images[1])
                for m in mix.METHODS}

    for method, (mask, other) in masks(jax.random.PRNGKey(0)).items():
        np.testing.assert_array_equal(mask, 1.0, err_msg=method)
        mixed, soft = mix.blend(images[:1], jnp.eye(2)[:1], mask[None], other[None], jnp.ones(1))
        np.testing.assert_array_equal(mixed, images[:1])
        np.testing.assert_array_equal(soft, jnp.eye(2)[:1])


@pytest.mark.slow
def test_probability_and_switch_prob_choose_how_often_and_which():
    images, labels = batch(size=64, side=8)
    off = mix.MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.0, mode="elem")
    mixed, soft, lam, _ = jitted_mix(off)(images, labels, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(mixed, images)
    np.testing.assert_array_equal(soft, labels)
    np.testing.assert_array_equal(lam, 1.0)
    cfg = mix.MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, fmix_alpha=1.0, switch_prob=0.8)
    assert cfg.methods == ("mixup", "cutmix", "fmix")
    assert cfg.probabilities() == pytest.approx((0.2, 0.4, 0.4))
    elem = mix.MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.8, mode="elem")
    _, _, lam, mask = jitted_mix(elem)(images, labels, jax.random.PRNGKey(1))
    assert (np.asarray(lam) < 1).mean() > 0.9  # prob 1: mixed (bar CutMix boxes of < 1 px)
    binary = np.isin(np.asarray(mask), (0.0, 1.0)).all(axis=(1, 2))  # cutmix masks are binary
    assert 0.6 < binary.mean() < 0.95


@pytest.mark.slow
def test_beta_draws_follow_beta_alpha_alpha():
    stats = pytest.importorskip("scipy.stats")
    keys = jax.random.split(jax.random.PRNGKey(0), 20_000)
    for alpha in (0.4, 1.0, 2.0):
        draws = np.asarray(jax.jit(jax.vmap(lambda k: mix.beta(k, alpha)))(keys))
        assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 1e-3, alpha


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["data", "fsdp"])
def test_eight_devices_mix_their_own_examples_without_collectives(fsdp):
    model, tx = tt.reference_model_and_tx()
    cfg = mix.MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0, saliencymix_alpha=1.0,
                        mode="pair", label_smoothing=0.1)
    mixer = mix.make_mixer(cfg, model.patch_size)
    strategy = parallel.MeshStrategy(model, tx, image_shape=(16, 16, 3), mesh=parallel.make_mesh(),
                                     fsdp=fsdp, mixer=mixer)
    images, labels = batch(size=32)
    host = {"image": images, "label": labels}
    key = jax.random.PRNGKey(11)
    sharded = jax.jit(strategy.mixer)
    compiled = sharded.lower(strategy.put_batch(host), key).compile()
    assert not COLLECTIVE.search(compiled.as_text())
    got = sharded(strategy.put_batch(host), key)
    assert got["image"].sharding.spec == P(parallel.DATA_AXIS)
    local = jax.jit(mixer)
    for d in range(8):  # device d: its 4 examples, flipped among themselves, its own key
        part = {k: v[4 * d:4 * d + 4] for k, v in host.items()}
        want = local(part, jax.random.fold_in(key, d))
        for k in ("image", "label"):
            np.testing.assert_array_equal(np.asarray(got[k])[4 * d:4 * d + 4], want[k])


@pytest.mark.slow
def test_train_step_mixes_each_micro_batch_with_the_step_key(accum_steps=2):
    model, tx, state = tt.reference_setup()
    mixer = mix.make_mixer(mix.MixConfig(mixup_alpha=1.0, cutmix_alpha=1.0, mode="elem"),
                           model.patch_size)
    host = tt.synthetic_batch(0)
    train = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                      accum_steps=accum_steps, mixer=mixer))
    got, metrics = train(state, host)
    # The same update from the batch mixed beforehand, micro-batch by micro-batch.
    rng = jax.random.fold_in(state.rng, state.step)
    micro = steps.split_microbatches(host, accum_steps)
    mixed = [mixer(jax.tree.map(lambda x: x[i], micro),
                   mix.step_key(jax.random.fold_in(rng, i)))
             for i in range(accum_steps)]
    premixed = jax.tree.map(  # undo split_microbatches' interleaving
        lambda *xs: jnp.swapaxes(jnp.stack(xs), 0, 1).reshape(-1, *xs[0].shape[1:]), *mixed)
    want, want_metrics = tt.jitted_train_step(model, tx, accum_steps)(state, premixed)
    np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    _, plain = tt.jitted_train_step(model, tx, accum_steps)(state, host)
    assert abs(float(metrics["loss"]) - float(plain["loss"])) > 1e-3  # it did mix


@pytest.mark.slow  # imports torch
def test_timm_mixup_and_cutmix_give_the_same_images_and_targets(monkeypatch):
    torch = pytest.importorskip("torch")
    timm_mixup = pytest.importorskip("timm.data.mixup")
    images, labels = batch(size=6, side=20)
    targets = np.asarray(labels).argmax(-1)
    # (lam timm draws, box centre it draws): boxes inside and clipped by the border.
    for use_cutmix, lam, centre in [(False, 0.3, None), (True, 0.4, (10, 7)),
                                    (True, 0.25, (1, 18))]:
        draws = iter(centre or ())
        monkeypatch.setattr(np.random, "rand", lambda *a: 0.0)  # mix: yes
        monkeypatch.setattr(np.random, "beta", lambda *a, **k: lam)
        monkeypatch.setattr(np.random, "randint", lambda *a, **k: next(draws))  # box centre
        mixer = timm_mixup.Mixup(mixup_alpha=0.0 if use_cutmix else 1.0,
                                 cutmix_alpha=1.0 if use_cutmix else 0.0, mode="batch",
                                 label_smoothing=0.1, num_classes=10)
        x = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())
        x, target = mixer(x, torch.from_numpy(targets))
        want_images, want_targets = x.numpy().transpose(0, 2, 3, 1), target.numpy()

        if use_cutmix:
            mask = mix.box_mask(*mix.cutmix_box(jnp.float32(lam), *centre, 20, 20), 20, 20)
            our_lam = jnp.mean(mask)
        else:
            our_lam = jnp.float32(lam)
            mask = jnp.full((20, 20), our_lam)
        masks = jnp.broadcast_to(mask, (6, 20, 20))
        got_images, got_targets = mix.blend(images, labels, masks, jnp.flip(images, 0),
                                            jnp.full(6, our_lam), 0.1)
        if use_cutmix:
            np.testing.assert_array_equal(got_images, want_images)
            assert (mask == 0).any() and (mask == 1).any()
        else:
            np.testing.assert_allclose(got_images, want_images, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got_targets, want_targets, rtol=1e-6, atol=1e-7)


def test_config_mix_section_is_validated_and_pp_mixup_points_to_it():
    config = train_config.base_config()
    config.mix.mode, config.mix.prob, config.mix.maskmix_alpha = "pairs", 1.5, 1.0
    config.mix.maskmix_cell = 3  # 3 x 16 px cells do not tile 224
    with pytest.raises(ConfigError) as error:
        train_config.validate(config)
    message = str(error.value)
    assert "mix.mode 'pairs'" in message and "mix.prob" in message
    assert "mix.maskmix_cell=3" in message
    old = train_config.base_config()
    old.pp.mixup = 0.5
    with pytest.raises(ConfigError, match=r"pp.mixup .* set mix.mixup_alpha=0.5") as error:
        train_config.validate(train_config.with_defaults(old))
    assert "unknown key" not in str(error.value)
    assert mix.make_mixer(mix.MixConfig.from_config(train_config.base_config().mix)) is None


@pytest.mark.slow
def test_benchmark_reports_each_methods_cost_against_the_training_step(capsys):
    from mixer_jax.benchmark import __main__ as cli
    results = cli.main(["--variant=Mixer-Ti_4", "--image_size=16", "--batch=4",
                        "--mode=train,mix", "--steps=1", "--ceiling=false"])
    assert [r["method"] for r in results["mix"]] == list(mix.METHODS)
    assert all(r["step_s"] > 0 and r["batch"] == 4 for r in results["mix"])
    table = capsys.readouterr().out
    assert "of train step" in table
    assert re.search(r"saliencymix\s+Mixer-Ti_4\s+4\s+batch\s+[\d.]+\s+[\d.]+%", table)


def test_comparison_runs_are_the_default_recipe_with_one_method_and_a_digits_sized_model():
    from mixer_jax import mix_compare, train_config

    config = mix_compare.run_config("resmlp_12_224", "cutmix", 2, 40, "train[:15%]")
    assert (config.model_name, config.seed, config.total_steps) == ("resmlp_12_224", 2, 40)
    assert config.pp.train == "train[:15%]" and config.warmup_steps == 4
    assert config.model.patch_size == 4  # the family's tiny overrides: 16x16 digits fit
    assert config.mix.cutmix_alpha > 0 and not config.mix.mixup_alpha
    train_config.validate(train_config.with_defaults(config))
