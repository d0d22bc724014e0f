"""Fine-tune Mixer-B/16 (ImageNet-21k) on a folder of your own images.

The folder holds `train/<class>/<image>` and `test/<class>/<image>` (any image
format, size or channel count; classes are the sorted sub-directory names).
Short schedule, as the paper's small transfer tasks (Pets, Flowers: 500 steps).

  python -m mixer_jax.main --config=configs/mixer_b16_folder.py:/data/my_images \\
      --workdir=/tmp/b16_folder --config.pretrained_dir=/path/to/imagenet21k
"""
from mixer_jax import train_config


def get_config(folder: str | None = None):
    config = train_config.base_config()
    config.dataset = folder or "/path/to/images"  # {train,test}/<class>/<file>
    config.pp.train = "train"
    config.pp.test = "test"
    config.pp.crop = 224
    config.pp.resize = 256
    config.pp.inception_crop = True
    config.pp.flip = True

    config.model_name = "Mixer-B_16"
    config.pretrained_dir = "gs://mixer_models/imagenet21k"
    config.model_or_filename = "Mixer-B_16"

    config.optim = "sgd"
    config.momentum = 0.9
    config.mu_dtype = "bfloat16"
    config.base_lr = 0.01
    config.warmup_steps = 50
    config.decay_type = "cosine"
    config.total_steps = 500
    config.grad_norm_clip = 1.0
    config.batch = 512
    config.accum_steps = 8
    config.batch_eval = 512
    config.shuffle_buffer = 5_000

    config.progress_every = 10
    config.eval_every = 100
    config.checkpoint_every = 100
    return config
