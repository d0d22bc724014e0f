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

Either way the parameters must form a complete MLP-Mixer (every array of the
architecture their shapes describe, a head, nothing else, all finite), checked
as `checkpoint.load_pretrained` checks them; an existing --out is an error unless
--overwrite is given.
"""
from __future__ import annotations

import jax
from absl import app, flags, logging
from etils import epath

from mixer_jax import checkpoint, metric_writers, models, resolution, train_checkpoint

COMMANDS = ("npz-to-orbax", "orbax-to-npz")

flags.DEFINE_string("npz", None, "npz-to-orbax: the .npz file to read (local or gs://).")
flags.DEFINE_string("checkpoint", None,
                    "orbax-to-npz: a workdir, its checkpoints directory, or one step directory.")
flags.DEFINE_string("out", None, "Where to write: a directory (orbax) or an .npz file.")
flags.DEFINE_integer("step", None, "orbax-to-npz: the step to export (default: latest).")
flags.DEFINE_bool("scan", False, "npz-to-orbax: write the stacked layout of scan=True models.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
FLAGS = flags.FLAGS


def validate_params(params, source: str) -> checkpoint.Architecture:
    """The architecture of `params` if they are a complete Mixer with a head, else CheckpointError.

    The check is `load_pretrained`'s: the parameters must fit, key for key and shape for
    shape, a model built with the architecture they describe.
    """
    try:
        arch = checkpoint.architecture(params)
        if arch.num_classes is None:
            raise checkpoint.CheckpointError("it has no head ('head/kernel', 'head/bias')")
        grid = resolution.square_grid(arch.num_tokens)
        model = models.MlpMixer(num_classes=arch.num_classes, **arch.model_fields())
        shapes = models.param_shapes(model, (grid[0] * arch.patch_size,
                                             grid[1] * arch.patch_size, 3))
        checkpoint.load_pretrained(params, shapes, reset_head=False)
    except (checkpoint.CheckpointError, ValueError) as error:
        raise checkpoint.CheckpointError(
            f"Cannot convert {source}: it is not a complete, valid MLP-Mixer ({error}).") from None
    return arch


def _check_out(out: str, overwrite: bool) -> None:
    path = epath.Path(out)
    if not path.exists():
        return
    if not overwrite:
        raise checkpoint.CheckpointError(
            f"--out {out} already exists; pass --overwrite to replace it, or choose another --out.")
    if path.is_dir():
        path.rmtree()


def npz_to_orbax(npz_path: str, out_dir: str, *, scan: bool = False,
                 overwrite: bool = False) -> str:
    """Writes the parameters of `npz_path` as a params-only orbax checkpoint (step 0)."""
    params = checkpoint.load_npz(npz_path)
    arch = validate_params(params, repr(npz_path))
    _check_out(out_dir, overwrite)
    if scan:
        params = jax.device_get(models.stack_blocks(params))
    train_checkpoint.save_params(params, out_dir, meta={"source": str(npz_path), "scan": scan})
    logging.info("Wrote %s (%s, %s layout) to %s.", npz_path, arch.name,
                 "scanned" if scan else "per-block", out_dir)
    return out_dir


def orbax_to_npz(checkpoint_path: str, out_path: str, *, step: int | None = None,
                 overwrite: bool = False) -> str:
    """Writes the parameters of an orbax checkpoint to `out_path` in the published layout."""
    params = train_checkpoint.restore_params(checkpoint_path, step=step)
    validate_params(params, repr(checkpoint_path))
    _check_out(out_path, overwrite)
    written = checkpoint.save_npz(params, out_path)
    logging.info("Wrote the parameters of %s to %s.", checkpoint_path, written)
    return written


def main(argv) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"Usage: python -m mixer_jax.convert {{{'|'.join(COMMANDS)}}} "
                             "--out=... (--npz=... | --checkpoint=... [--step=N])")
    if not FLAGS.out:
        raise app.UsageError("--out is required.")
    metric_writers.quiet_library_logs()
    if argv[1] == "npz-to-orbax":
        if not FLAGS.npz:
            raise app.UsageError("npz-to-orbax needs --npz.")
        npz_to_orbax(FLAGS.npz, FLAGS.out, scan=FLAGS.scan, overwrite=FLAGS.overwrite)
    else:
        if not FLAGS.checkpoint:
            raise app.UsageError("orbax-to-npz needs --checkpoint.")
        orbax_to_npz(FLAGS.checkpoint, FLAGS.out, step=FLAGS.step, overwrite=FLAGS.overwrite)


if __name__ == "__main__":
    app.run(main)
