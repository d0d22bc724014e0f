"""Convert model parameters between published `.npz` files and orbax checkpoints.

  # A published (or any save_npz) file -> an orbax checkpoint that a run on a pod
  # restores straight into its shardings (pass --scan for models trained with
  # config.model.scan=True, whose blocks are stacked):
  python -m mixer_jax.convert npz-to-orbax --npz=gs://mixer_models/imagenet21k/Mixer-B_16.npz \\
      --out=gs://bucket/Mixer-B_16_orbax
  # then fine-tune with --config.pretrained_dir=gs://bucket --config.model_or_filename=Mixer-B_16_orbax

  # The parameters of a training run (its workdir, checkpoints directory or one step
  # directory; latest step unless --step) -> the published layout:
  python -m mixer_jax.convert orbax-to-npz --checkpoint=/tmp/mixer_digits --out=/tmp/digits.npz
"""
from __future__ import annotations

import jax
from absl import app, flags, logging

from mixer_jax import checkpoint, cli, models, train_checkpoint

COMMANDS = ("npz-to-orbax", "orbax-to-npz")

flags.DEFINE_string("npz", None, "npz-to-orbax: the .npz file to read (local or gs://).")
flags.DEFINE_string("checkpoint", None,
                    "orbax-to-npz: a workdir, its checkpoints directory, or one step directory.")
flags.DEFINE_string("out", None, "Where to write: a directory (orbax) or an .npz file.")
flags.DEFINE_integer("step", None, "orbax-to-npz: the step to export (default: latest).")
flags.DEFINE_bool("scan", False, "npz-to-orbax: write the stacked layout of scan=True models.")
FLAGS = flags.FLAGS


def npz_to_orbax(npz_path: str, out_dir: str, *, scan: bool = False) -> str:
    """Writes the parameters of `npz_path` as a params-only orbax checkpoint (step 0)."""
    params = checkpoint.load_npz(npz_path)
    if scan:
        params = jax.device_get(models.stack_blocks(params))
    train_checkpoint.save_params(params, out_dir, meta={"source": str(npz_path), "scan": scan})
    arch = checkpoint.architecture(params)
    logging.info("Wrote %s (%s, %s layout) to %s.", npz_path, arch.name,
                 "scanned" if scan else "per-block", out_dir)
    return out_dir


def orbax_to_npz(checkpoint_path: str, out_path: str, *, step: int | None = None) -> str:
    """Writes the parameters of an orbax checkpoint to `out_path` in the published layout."""
    params = train_checkpoint.restore_params(checkpoint_path, step=step)
    written = checkpoint.save_npz(params, out_path)
    logging.info("Wrote the parameters of %s to %s.", checkpoint_path, written)
    return written


def main(argv) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"Usage: python -m mixer_jax.convert {{{'|'.join(COMMANDS)}}} "
                             "--out=... (--npz=... | --checkpoint=... [--step=N])")
    if not FLAGS.out:
        raise app.UsageError("--out is required.")
    if argv[1] == "npz-to-orbax":
        if not FLAGS.npz:
            raise app.UsageError("npz-to-orbax needs --npz.")
        npz_to_orbax(FLAGS.npz, FLAGS.out, scan=FLAGS.scan)
    else:
        if not FLAGS.checkpoint:
            raise app.UsageError("orbax-to-npz needs --checkpoint.")
        orbax_to_npz(FLAGS.checkpoint, FLAGS.out, step=FLAGS.step)


if __name__ == "__main__":
    cli.run(main, flag_values=FLAGS)
