"""Every config key the training job reads, with its default, and the sanity checks.

Shipped configs (`configs/*.py`) start from `base_config()` and change what they
need, so `--config.<key>=...` works for every key below and a typo in a config
file is caught by `validate` instead of being silently ignored. Key names follow
vit_jax where it has them.

Data (read by `input_pipeline`):
  dataset           tfds name (e.g. "cifar10"), or a directory `{train,test}/<class>/<file>`.
  tfds_data_dir     tfds data dir (None: tfds' default); tfds_manual_dir for manual downloads.
  pp.train, pp.test split strings; pp.crop image size fed to the model;
  pp.resize         eval: shorter side before the centre crop (None: resize straight to crop);
  pp.inception_crop, pp.flip, pp.randaugment ((layers, magnitude) or None);
  pp.mean, pp.std   per-channel pixel statistics on a 0-1 scale (None: the pretrained
                    source's preprocessing if it has one, else the model family's, e.g.
                    (0.5,)*3 = [-1, 1] for Mixer, ImageNet's for ResMLP; see `train.prepare`).
  batch, batch_eval GLOBAL batch sizes (all hosts, all devices); shuffle_buffer; seed.
  skip_bad_images   image folders: train without unreadable files instead of stopping.
Mixed-sample augmentation (read by `mix.MixConfig`, applied in the training step on each
  device): mix.mixup_alpha, cutmix_alpha, cutmix_minmax, fmix_alpha, fmix_decay, resizemix,
  resizemix_scale, saliencymix_alpha, maskmix_alpha, maskmix_cell, prob, switch_prob, mode,
  label_smoothing, correct_lam (timm's names and meanings where timm has them; all off).
Model: model_name (any `models.list_models()` name) and model.* (overrides of that family's
  module fields: dropout, stoch_depth, dtype, scan, remat, and architecture fields for tiny
  custom models).
Fine-tuning: pretrained (any source `finetune.read_source` takes: an `.npz`, an orbax
  checkpoint, timm weights), or pretrained_dir + model_or_filename -> a published `.npz` or an
  orbax checkpoint (a workdir or checkpoint directory of an earlier run); reset_head (None: when
  the class count differs); token_mixing (how `finetune.load_pretrained` adapts to another
  image size).
Optimiser (read by `optim.make_optimizer`): optim, momentum, mu_dtype, b1, b2, weight_decay,
  base_lr, warmup_steps, decay_type, linear_end, total_steps, grad_norm_clip, accum_steps.
Parallelism (read by `parallel.make_strategy`): parallelism ('pmap' | 'data' | 'fsdp'),
  mesh_model (size of the 'model' mesh axis), fsdp_min_size.
Loop: progress_every, eval_every, checkpoint_every (in steps), keep_checkpoints (how many of
  the latest checkpoints stay on disk), async_checkpoints.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import pathlib

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from mixer_jax import mix, models
from mixer_jax.models import registry
from mixer_jax.errors import ConfigError
from mixer_jax.optim import DECAY_TYPES, OPTIMIZERS
from mixer_jax.parallel import PARALLELISMS

DTYPES = ("float32", "bfloat16", "float16")


def base_config() -> ml_collections.ConfigDict:
    """All known keys with their defaults (the fine-tuning recipe of the paper)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.dataset = "sklearn_digits"
    c.tfds_data_dir = config_dict.placeholder(str)
    c.tfds_manual_dir = config_dict.placeholder(str)
    c.pp = ml_collections.ConfigDict(dict(
        train="train", test="test", crop=224, resize=256, inception_crop=True,
        flip=True, randaugment=config_dict.placeholder(tuple),
        mean=config_dict.placeholder(tuple), std=config_dict.placeholder(tuple),
    ))
    c.mix = _mix_defaults()
    c.batch = 512
    c.batch_eval = 512
    c.shuffle_buffer = 10_000
    c.skip_bad_images = False

    c.model_name = "Mixer-B_16"
    c.model = ml_collections.ConfigDict(dict(
        dropout=0.0, stoch_depth=0.0, dtype="float32", scan=False, remat=False,
    ))
    # Architecture fields, unset (the variant's) unless given: present so that
    # `--config.model.hidden_dim=32` parses; `with_defaults` drops the unset ones.
    for name in models.MODEL_FIELDS:
        c.model[name] = config_dict.placeholder(int)

    c.pretrained = config_dict.placeholder(str)
    c.pretrained_dir = "."
    c.model_or_filename = config_dict.placeholder(str)
    c.reset_head = config_dict.placeholder(bool)
    c.token_mixing = "auto"

    c.optim = "sgd"
    c.momentum = 0.9
    c.mu_dtype = config_dict.placeholder(str)
    c.b1 = 0.9
    c.b2 = 0.999
    c.weight_decay = 0.0
    c.base_lr = 0.03
    c.warmup_steps = 500
    c.decay_type = "cosine"
    c.linear_end = 1e-5  # final learning rate of the linear decay
    c.total_steps = 10_000
    c.grad_norm_clip = 1.0
    c.accum_steps = 1

    c.parallelism = "data"
    c.mesh_model = 1
    c.fsdp_min_size = 2**16  # fsdp: arrays with fewer elements stay replicated

    c.progress_every = 100
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    return c


def _mix_defaults() -> ml_collections.ConfigDict:
    """`config.mix`: the fields of `mix.MixConfig` with its defaults (everything off)."""
    section = ml_collections.ConfigDict()
    for field in dataclasses.fields(mix.MixConfig):
        if field.default is None:  # a (low, high) pair, unset
            section[field.name] = config_dict.placeholder(tuple)
        else:
            section[field.name] = field.default
    return section


def b16_transfer_config(dataset: str) -> ml_collections.ConfigDict:
    """The paper's transfer recipe for Mixer-B/16 (ImageNet-21k) on `dataset`.

    As the original code: SGD momentum 0.9 kept in bfloat16, global batch 512
    accumulated over 8 micro-batches, 500 warmup steps then cosine decay, clipping
    at norm 1, no weight decay, 224x224 crops (eval: shorter side 256, centre crop).
    """
    c = base_config()
    c.dataset = dataset
    c.pp.crop, c.pp.resize = 224, 256
    c.pp.inception_crop = c.pp.flip = True
    c.model_name = c.model_or_filename = "Mixer-B_16"  # -> <pretrained_dir>/Mixer-B_16.npz
    c.pretrained_dir = "gs://mixer_models/imagenet21k"
    c.optim, c.momentum, c.mu_dtype = "sgd", 0.9, "bfloat16"
    c.weight_decay, c.grad_norm_clip = 0.0, 1.0
    c.decay_type = "cosine"
    c.batch = c.batch_eval = 512
    c.accum_steps = 8
    return c


def _unknown_keys(config, known, prefix="") -> list[str]:
    """Dotted names of keys in `config` that `known` does not have (recursively)."""
    unknown = []
    for key, value in config.items():
        name = prefix + key
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            unknown.append(name + (f" (did you mean {prefix + close[0]!r}?)" if close else ""))
        elif isinstance(value, ml_collections.ConfigDict) and name != "model":
            unknown += _unknown_keys(value, known[key], name + ".")
    return unknown


def model_kwargs(config) -> dict:
    """Model field overrides from `config.model` (unset ones left out), dtype names as dtypes."""
    kwargs = {k: v for k, v in config.model.items() if v is not None}
    for key in ("dtype", "param_dtype"):
        if key in kwargs:
            kwargs[key] = jnp.dtype(kwargs[key])
    return kwargs


def _model_options(model_name: str) -> set[str] | None:
    """The `config.model` options the model accepts (None: unknown model); `scan` for every
    family (`create_model` takes scan=False from all, scan=True from isotropic ones)."""
    try:
        return registry.model_fields(models.get_family(model_name)) - {"num_classes"} | {"scan"}
    except ValueError:
        return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(config, *, num_devices: int | None = None, process_count: int = 1) -> None:
    """Raises ConfigError listing every problem found in `config`.

    With `num_devices`, also checks that each micro-batch splits evenly over the devices.
    Every check runs on its own: one bad value never hides (or crashes) another check.
    """
    problems = [f"unknown key {k}" for k in _unknown_keys(config, base_config())]

    def check(ok, message):
        if not ok:
            problems.append(message)

    def positive(key, value, *, allow_none=False):
        ok = (allow_none and value is None) or (_is_int(value) and value >= 1)
        check(ok, f"{key}={value!r} must be a positive integer")
        return ok

    # The model: a registered name, its family's options, an image size it takes.
    known_model = registry.canonical_name(config.model_name) in models.list_models()
    check(known_model, f"model_name {config.model_name!r} is not a registered model; "
          "`mixer_jax.models.list_models()` lists every name")
    options = _model_options(config.model_name)
    model = {k: v for k, v in config.model.items() if v is not None}
    bad_model = sorted(set(model) - options) if options is not None else []
    if bad_model:
        problems.append(f"unknown model option(s) {bad_model} for {config.model_name}; "
                        f"known: {sorted(options)}")
    family = models.get_family(config.model_name) if options is not None else None
    unscannable = bool(model.get("scan")) and family is not None and family.block_layout is None
    check(not unscannable, f"model.scan=True: {family and registry.ScanError(family)}")
    fields_ok = all(positive(f"model.{name}", model[name])
                    for name in models.MODEL_FIELDS if name in model)
    for name in ("dropout", "stoch_depth"):
        value = model.get(name, 0.0)
        check(isinstance(value, (int, float)) and 0 <= value < 1,
              f"model.{name}={value!r} must be in [0, 1)")
    check(model.get("dtype", "float32") in DTYPES, f"model.dtype must be one of {DTYPES}")
    crop_ok = positive("pp.crop", config.pp.crop)
    if known_model and not bad_model and not unscannable and fields_ok and crop_ok:
        problems += _image_size_problems(config)
    for key in ("mean", "std"):
        value = config.pp.get(key)
        check(value is None or len(value) == 3, f"pp.{key}={value} must be None or 3 "
              "per-channel values (0-1 scale)")
    check(not config.pp.get("std") or min(config.pp.std) > 0, "pp.std must be positive")
    positive("pp.resize", config.pp.get("resize"), allow_none=True)
    batch_ok = positive("batch", config.batch)
    batch_eval_ok = positive("batch_eval", config.batch_eval, allow_none=True)
    positive("shuffle_buffer", config.shuffle_buffer)

    check(config.optim in OPTIMIZERS, f"optim {config.optim!r} is not one of {OPTIMIZERS}")
    check(config.decay_type in DECAY_TYPES,
          f"decay_type {config.decay_type!r} is not one of {DECAY_TYPES}")
    check(config.mu_dtype in (None, "bfloat16", "float32"),
          f"mu_dtype must be None, 'bfloat16' or 'float32', not {config.mu_dtype!r}")
    check(config.parallelism in PARALLELISMS,
          f"parallelism {config.parallelism!r} is not one of {PARALLELISMS}")
    mesh_ok = positive("mesh_model", config.mesh_model)
    check(not (config.parallelism == "pmap" and mesh_ok and config.mesh_model > 1),
          "mesh_model > 1 needs parallelism 'data' or 'fsdp' (pmap has no model axis)")
    steps_ok = positive("total_steps", config.total_steps)
    check(not steps_ok or 0 <= config.warmup_steps < config.total_steps,
          f"warmup_steps={config.warmup_steps} must be in [0, total_steps={config.total_steps})")
    check(config.base_lr > 0, f"base_lr={config.base_lr} must be positive")
    accum_ok = positive("accum_steps", config.accum_steps)
    if batch_ok and accum_ok:
        check(config.batch % config.accum_steps == 0,
              f"batch={config.batch} is not divisible by accum_steps={config.accum_steps}")
    batch_eval = config.batch_eval or config.batch
    if batch_ok and batch_eval_ok:
        check(config.batch % process_count == 0 and batch_eval % process_count == 0,
              f"batch={config.batch} and batch_eval={config.batch_eval} must divide over "
              f"{process_count} processes")
    if num_devices and mesh_ok:
        data_devices = num_devices // config.mesh_model
        check(num_devices % config.mesh_model == 0,
              f"mesh_model={config.mesh_model} does not divide the {num_devices} devices")
        if data_devices and batch_ok and accum_ok:
            check((config.batch // config.accum_steps) % data_devices == 0,
                  f"the micro-batch batch/accum_steps={config.batch // config.accum_steps} "
                  f"does not split over {data_devices} data-parallel devices")
        if data_devices and batch_ok and batch_eval_ok:
            check(batch_eval % data_devices == 0,
                  f"batch_eval={batch_eval} does not split over {data_devices} devices")
    for key in ("progress_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        positive(key, config[key])
    check(config.token_mixing in ("auto", "block_diagonal", "resample", "reinit"),
          f"token_mixing {config.token_mixing!r} is not auto/block_diagonal/resample/reinit")
    check(not config.model_or_filename or config.pretrained_dir is not None,
          "model_or_filename needs pretrained_dir")
    # Mixed-sample augmentation (`mixer_jax.mix`): config.mix, and the host-side pp.mixup's end.
    if "mixup" in config.pp:
        problems[:] = [p for p in problems if not p.startswith("unknown key pp.mixup")]
        problems.append(f"pp.mixup is no longer read: mixing runs in the training step on the "
                        f"devices; set mix.mixup_alpha={config.pp.mixup} instead")
    mix_fields = {f.name for f in dataclasses.fields(mix.MixConfig)}
    problems += mix.MixConfig.from_config(
        {k: v for k, v in config.mix.items() if k in mix_fields}).problems(
            _patch_size(config), config.pp.crop)
    if problems:
        raise ConfigError("Invalid config:\n  - " + "\n  - ".join(problems))


def preprocessing(config) -> models.Preprocessing:
    """What a run feeds its model (after `train.prepare` filled in pp.mean/pp.std)."""
    pp, default = config.pp, models.get_family(config.model_name).preprocessing
    return models.Preprocessing(
        mean=tuple(pp.mean) if pp.get("mean") else default.mean,
        std=tuple(pp.std) if pp.get("std") else default.std,
        input_size=pp.crop, crop_pct=pp.crop / pp.resize if pp.get("resize") else 1.0,
        interpolation="bilinear")


def _patch_size(config) -> int | None:
    """The model's patch size, for families that have one (None otherwise)."""
    try:
        variant = models.get_family(config.model_name).variants.get(
            registry.canonical_name(config.model_name), {})
    except ValueError:
        variant = {}
    return config.model.get("patch_size") or variant.get("patch_size")


def _image_size_problems(config) -> list[str]:
    """pp.crop must fit the model (patch size, downsampling): checked on abstract shapes."""
    try:
        model = models.create_model(config.model_name, **model_kwargs(config))
        models.param_shapes(model, (config.pp.crop, config.pp.crop, 3))
    except (ValueError, TypeError, ZeroDivisionError) as e:
        return [f"pp.crop={config.pp.crop} does not fit {config.model_name} "
                f"(with config.model {model_kwargs(config)}): {e}"]
    return []


def check_before_training(config, info) -> None:
    """Raises ConfigError listing every problem that needs the dataset to be seen, so that
    a run fails at start-up instead of at its first evaluation (`validate` checks the rest).

    `info`: the dataset's `input_pipeline.DatasetInfo` (class count, split sizes).
    """
    problems = []
    crop, resize = config.pp.crop, config.pp.get("resize")
    if resize and resize < crop:
        problems.append(
            f"pp.resize={resize} (the eval images' shorter side before the centre crop) is "
            f"smaller than pp.crop={crop}: set pp.resize={eval_resize(crop)} (256/224 of "
            "the crop, as the paper evaluates) or pp.resize=None (resize straight to the crop)")
    for key, count in (("pp.train", info.num_train_examples),
                       ("pp.test", info.num_eval_examples)):
        if not count:
            problems.append(f"{key}={config.pp[key.split('.')[1]]!r} selects no examples "
                            f"of {config.dataset!r}")
    if info.num_classes < 2:
        problems.append(f"{config.dataset!r} has {info.num_classes} class(es); a classifier "
                        "needs at least 2")
    if problems:
        raise ConfigError("Invalid config for this dataset:\n  - " + "\n  - ".join(problems))


def eval_resize(crop: int) -> int:
    """The paper's evaluation resize for a crop: 256/224 of it (224 -> 256, 448 -> 512)."""
    return round(crop * 256 / 224)


def with_defaults(config) -> ml_collections.ConfigDict:
    """A copy of `config` with every key it lacks taken from `base_config()`."""
    merged = base_config()
    _merge_into(merged, config)
    for name in models.MODEL_FIELDS:  # unset architecture fields: the variant's
        if merged.model.get(name) is None:
            del merged.model[name]
    return merged


def _merge_into(target, source):
    for key, value in source.items():
        # Model overrides are open-ended (any MlpMixer field) and merge like the rest;
        # validate() vets them.
        if isinstance(value, ml_collections.ConfigDict) and key in target:
            _merge_into(target[key], value)
        else:
            target[key] = value


# ------------------------------------------------------------------------ shipped configs


def configs_dir() -> pathlib.Path:
    """The folder of the shipped configs: `mixer_jax/configs` in an installed package (the
    wheel carries the repository's `configs/` there), else `configs/` of the checkout."""
    spec = importlib.util.find_spec("mixer_jax.configs")
    if spec is not None and spec.submodule_search_locations:
        return pathlib.Path(list(spec.submodule_search_locations)[0])
    return pathlib.Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> list[str]:
    """Names of the shipped configs, e.g. ['default', 'mixer_b16_cifar10', ...]."""
    return sorted(p.stem for p in configs_dir().glob("*.py") if not p.stem.startswith("_"))


def config_path(name_or_path: str) -> str:
    """`--config` value -> a config file: an existing path as it is; a shipped config's
    name (`default`, `mixer_b16_folder.py`, `configs/default.py`) -> its shipped file.
    A `:argument` suffix is kept."""
    path, colon, argument = name_or_path.partition(":")
    if os.path.exists(path):
        return name_or_path
    name = os.path.basename(path).removesuffix(".py")
    if name in shipped_configs() and os.path.dirname(path) in ("", "configs"):
        return str(configs_dir() / f"{name}.py") + colon + argument
    raise ConfigError(f"No config file {path!r}; give a path to a .py config or one of the "
                      f"shipped configs: {', '.join(shipped_configs())}.")
