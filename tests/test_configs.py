"""Every shipped config loads through the command-line flag machinery and makes sense."""
import pathlib

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from mixer_jax import models, optim, train, train_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(p.name for p in CONFIG_DIR.glob("*.py") if p.name != "__init__.py")


def load(spec: str, *overrides: str):
    """Parses `--config=<spec> <overrides>` exactly as `mixer_jax.main` does."""
    argv = ["prog", f"--config={spec}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_the_expected_configs_are_shipped():
    assert {"default.py", "mixer_b16_cifar10.py", "mixer_b16_folder.py",
            "mixer_b16_imagenet_pretrain.py"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_is_sane(name):
    config = load(str(CONFIG_DIR / name))
    # Only known keys (a typo would be silently ignored otherwise), complete, consistent.
    assert set(config.keys()) == set(train_config.base_config().keys())
    train_config.validate(config, num_devices=8)
    assert config.batch % config.accum_steps == 0
    assert config.warmup_steps < config.total_steps
    assert config.eval_every <= config.total_steps
    assert config.checkpoint_every <= config.total_steps
    # The optimizer and schedule build, and the schedule peaks at base_lr after warmup.
    tx, schedule = optim.make_optimizer(config)
    assert float(schedule(config.warmup_steps)) == pytest.approx(config.base_lr, rel=1e-5)
    # The model builds at the configured image size (shapes only: no memory is used).
    model = train.create_model(config, num_classes=10)
    images = jax.ShapeDtypeStruct((1, config.pp.crop, config.pp.crop, 3), jnp.float32)
    params = models.param_shapes(model, images.shape[1:])
    logits = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, images)
    assert logits.shape == (1, 10)
    jax.eval_shape(tx.init, params)


def test_cifar10_config_is_the_papers_fine_tuning_recipe():
    c = load(str(CONFIG_DIR / "mixer_b16_cifar10.py"))
    assert (c.optim, c.momentum, c.mu_dtype, c.batch, c.accum_steps) == (
        "sgd", 0.9, "bfloat16", 512, 8)
    assert (c.decay_type, c.warmup_steps, c.total_steps, c.base_lr, c.grad_norm_clip) == (
        "cosine", 500, 10_000, 0.03, 1.0)
    assert (c.model_name, c.pp.crop, c.weight_decay) == ("Mixer-B_16", 224, 0.0)
    assert (c.pretrained_dir, c.model_or_filename) == (
        "gs://mixer_models/imagenet21k", "Mixer-B_16")


def test_imagenet_config_is_the_papers_pretraining_recipe():
    c = load(str(CONFIG_DIR / "mixer_b16_imagenet_pretrain.py"))
    assert c.optim in ("adam", "adamw") and (c.b1, c.b2) == (0.9, 0.999)
    assert (c.base_lr, c.weight_decay, c.batch, c.warmup_steps, c.decay_type) == (
        1e-3, 0.1, 4096, 10_000, "linear")
    assert c.total_steps * c.batch == pytest.approx(300 * 1_281_167, rel=1e-3)  # 300 epochs
    assert (tuple(c.pp.randaugment), c.mix.mixup_alpha, c.model.stoch_depth) == ((2, 15), 0.5, 0.1)
    assert c.grad_norm_clip == 1.0 and c.model_or_filename is None


def test_config_argument_and_overrides_reach_the_config():
    c = load(f"{CONFIG_DIR / 'mixer_b16_folder.py'}:/data/pets", "--config.batch=64",
             "--config.accum_steps=2", "--config.model.dtype=bfloat16")
    assert (c.dataset, c.batch, c.accum_steps, c.model.dtype) == ("/data/pets", 64, 2, "bfloat16")
    assert load(f"{CONFIG_DIR / 'mixer_b16_cifar10.py'}:cifar100").dataset == "cifar100"
    with pytest.raises(Exception, match="warmup_step"):  # locked: unknown keys are refused
        load(str(CONFIG_DIR / "default.py"), "--config.warmup_step=3")


def test_validate_reports_every_problem_by_name():
    config = train_config.base_config()
    config.warmup_stpes = 10
    config.model.dropuot = 0.1
    config.batch, config.accum_steps = 100, 8
    config.optim = "lamb"
    with pytest.raises(ValueError) as error:
        train_config.validate(config, num_devices=8)
    message = str(error.value)
    for expected in ("warmup_stpes", "did you mean 'warmup_steps'", "dropuot",
                     "accum_steps=8", "lamb"):
        assert expected in message
    config = train_config.base_config()
    config.batch, config.accum_steps = 96, 2
    train_config.validate(config, num_devices=8)  # micro-batches of 48 over 8 devices
    config.batch = 20
    with pytest.raises(ValueError, match="batch/accum_steps=10 does not split over 8"):
        train_config.validate(config, num_devices=8)
