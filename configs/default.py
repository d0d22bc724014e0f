"""The offline default: a tiny Mixer trained from scratch on the embedded digits.

Reaches >= 97% test accuracy on scikit-learn's handwritten digits (360 test
images) in about a minute on 2 CPU cores, with no download:

  python -m mixer_jax.main --config=default --workdir=/tmp/mixer_digits

The 8x8 digits are resized to 16x16 so that Mixer-Ti_4 sees a 4x4 grid of patches.
"""
from ml_collections import config_dict

from mixer_jax import train_config


def get_config():
    config = train_config.base_config()
    config.dataset = "sklearn_digits"
    config.pp.crop = 16
    # eval: resize straight to the crop, like training (a placeholder, not a plain None, so
    # that --config.pp.resize=N still works)
    config.pp.resize = config_dict.placeholder(int)
    config.pp.inception_crop = False  # 8x8 digits: no random crops, no flips
    config.pp.flip = False

    config.model_name = "Mixer-Ti_4"

    config.optim = "adam"
    config.base_lr = 1e-2
    config.warmup_steps = 20
    config.decay_type = "cosine"
    config.total_steps = 200
    config.grad_norm_clip = 1.0
    config.batch = 128
    config.batch_eval = 128
    config.shuffle_buffer = 2_000  # the whole train split (1437 images)

    config.progress_every = 50
    config.eval_every = 100
    config.checkpoint_every = 100
    config.keep_checkpoints = 2
    return config
