"""Fine-tune Mixer-B/16 (ImageNet-21k) on a folder of your own images.

The folder holds `train/<class>/<image>` and `test/<class>/<image>` (any image
format, size or channel count; classes are the sorted sub-directory names).
The paper's transfer recipe (`train_config.b16_transfer_config`) with the short
schedule of its small tasks (Pets, Flowers: 500 steps).

  python -m mixer_jax.main --config=configs/mixer_b16_folder.py:/data/my_images \\
      --workdir=/tmp/b16_folder --config.pretrained_dir=/path/to/imagenet21k
"""
from mixer_jax import train_config


def get_config(folder: str | None = None):
    config = train_config.b16_transfer_config(folder or "/path/to/images")
    config.base_lr = 0.01
    config.warmup_steps = 50
    config.total_steps = 500
    config.shuffle_buffer = 5_000
    config.progress_every = 10
    config.eval_every = 100
    config.checkpoint_every = 100
    return config
