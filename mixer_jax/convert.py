"""Convert model parameters between published `.npz` files and orbax checkpoints.

  # A published (or any save_npz) file -> an orbax checkpoint that a run on a pod
  # restores straight into its shardings (pass --scan for models trained with
  # config.model.scan=True, whose blocks are stacked; any isotropic family):
  python -m mixer_jax.convert npz-to-orbax --npz=gs://mixer_models/imagenet21k/Mixer-B_16.npz \\
      --out=gs://bucket/Mixer-B_16_orbax
  # then fine-tune with --config.pretrained_dir=gs://bucket --config.model_or_filename=Mixer-B_16_orbax

  # The parameters of a training run (its workdir, checkpoints directory or one step
  # directory; latest step unless --step) -> the published layout:
  python -m mixer_jax.convert orbax-to-npz --checkpoint=/tmp/mixer_digits --out=/tmp/digits.npz

  # timm's weights (a .safetensors/.pth file, a Hub snapshot folder or an hf-hub: id;
  # --model only where the file's shapes don't say it) -> npz (MLP-Mixer) or orbax:
  python -m mixer_jax.convert timm-to-orbax --timm=hf-hub:timm/gmixer_24_224.ra3_in1k \
      --out=/tmp/gmixer_24_orbax
  python -m mixer_jax.convert timm-to-npz --timm=/tmp/mixer_b16_224/model.safetensors \
      --out=/tmp/Mixer-B_16.npz
  # and back: a .safetensors file that timm.create_model(<name>) loads (--model: a
  # registered name; default: recognised from the shapes, timm's name for Mixer):
  python -m mixer_jax.convert npz-to-timm --npz=/tmp/digits.npz --model=Mixer-Ti_4 ...
  python -m mixer_jax.convert orbax-to-timm --checkpoint=/tmp/gmixer_24_orbax \
      --out=/tmp/gmixer_24_224.safetensors

The npz commands write only a complete MLP-Mixer (every array of the architecture
their shapes describe, a head, nothing else, all finite), checked as
`checkpoint.load_pretrained` checks them. An existing --out is an error unless
--overwrite is given.
"""
from __future__ import annotations

import dataclasses

import jax
from absl import app, flags, logging
from etils import epath

from mixer_jax import (checkpoint, cli, finetune, models, resolution, timm_weights,
                       train_checkpoint)

COMMANDS = ("npz-to-orbax", "orbax-to-npz", "timm-to-npz", "timm-to-orbax", "npz-to-timm",
            "orbax-to-timm")

flags.DEFINE_string("npz", None, "npz-to-orbax: the .npz file to read (local or gs://).")
flags.DEFINE_string("checkpoint", None,
                    "orbax-to-*: a workdir, its checkpoints directory, or one step directory.")
flags.DEFINE_string("timm", None, "timm-to-*: a .safetensors/.pth file, a Hugging Face Hub "
                    "snapshot folder, or hf-hub:timm/<name>.<tag>.")
flags.DEFINE_string("model", None, "The registered model name (e.g. gmixer_24_224), where the "
                    "weights' shapes do not say it.")
flags.DEFINE_string("out", None, "Where to write: a directory (orbax) or an .npz file.")
flags.DEFINE_integer("step", None, "orbax-to-*: the step to export (default: latest).")
flags.DEFINE_bool("scan", False, "*-to-orbax: write the stacked layout of scan=True models "
                  "(isotropic families: Mixer, gMixer, ResMLP, gMLP).")
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


def check_out(out: str, overwrite: bool) -> None:
    """Refuses an existing `out` unless `overwrite`; then removes an existing directory."""
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
    if scan:
        params = _scanned(params, finetune.identify(checkpoint.flatten_params(params))[0])
    check_out(out_dir, overwrite)
    train_checkpoint.save_params(params, out_dir, meta={"source": str(npz_path), "scan": scan})
    logging.info("Wrote %s (%s, %s layout) to %s.", npz_path, arch.name,
                 "scanned" if scan else "per-block", out_dir)
    return out_dir


def _scanned(params, family: models.Family) -> dict:
    """Per-block `params` of `family` stacked as its scan=True models hold them (host arrays)."""
    return jax.device_get(family.scanned(params))


def orbax_to_npz(checkpoint_path: str, out_path: str, *, step: int | None = None,
                 overwrite: bool = False) -> str:
    """Writes the parameters of an orbax checkpoint to `out_path` in the published layout."""
    params = train_checkpoint.restore_params(checkpoint_path, step=step)
    validate_params(params, repr(checkpoint_path))
    check_out(out_path, overwrite)
    written = checkpoint.save_npz(params, out_path)
    logging.info("Wrote the parameters of %s to %s.", checkpoint_path, written)
    return written


def timm_to_npz(source: str, out_path: str, *, model: str | None = None) -> str:
    """Writes timm's MLP-Mixer weights as a published-layout `.npz` (Mixer only: the npz
    format is Mixer's; other families go to orbax)."""
    weights = timm_weights.read_timm(source, model)
    if models.get_family(weights.name).name != "mixer":
        raise checkpoint.CheckpointError(
            f"{weights.source} is {weights.name}; .npz files hold MLP-Mixer parameters only. "
            "Use timm-to-orbax.")
    written = checkpoint.save_npz(weights.params, out_path)
    logging.info("Wrote %s (%s) to %s.", weights.source, weights.name, written)
    return written


def timm_to_orbax(source: str, out_dir: str, *, model: str | None = None,
                  scan: bool = False, overwrite: bool = False) -> str:
    """Writes timm weights as a params-only orbax checkpoint (step 0); the meta records the
    model name, class count and preprocessing."""
    weights = timm_weights.read_timm(source, model)
    params = _scanned(weights.params, models.get_family(weights.name)) if scan else weights.params
    check_out(out_dir, overwrite)
    train_checkpoint.save_params(params, out_dir, meta={
        "source": str(source), "scan": scan, "model_name": weights.name,
        "num_classes": weights.num_classes,
        "preprocessing": dataclasses.asdict(weights.preprocessing)})
    logging.info("Wrote %s (%s) to %s.", weights.source, weights.name, out_dir)
    return out_dir


def _save_timm(params, out_path: str, model: str | None, what: str,
               preprocessing: models.Preprocessing | None = None) -> str:
    name = model or timm_weights.model_name(params)
    if name is None:
        raise checkpoint.CheckpointError(f"{what} is not a registered model variant; pass "
                                         "--model=<name>.")
    name = models.get_family(name).timm_names.get(name, name)  # Mixer-B_16 -> mixer_b16_224
    written = timm_weights.save_timm(
        params, name, out_path, image_size=preprocessing and preprocessing.input_size,
        preprocessing=preprocessing)
    logging.info("Wrote %s as %s to %s.", what, name, written)
    return written


def npz_to_timm(npz_path: str, out_path: str, *, model: str | None = None) -> str:
    """Writes an `.npz` as `.safetensors` in timm's layout."""
    return _save_timm(checkpoint.load_npz(npz_path), out_path, model, npz_path)


def orbax_to_timm(checkpoint_path: str, out_path: str, *, model: str | None = None,
                  step: int | None = None) -> str:
    """Writes the parameters of an orbax checkpoint as `.safetensors` in timm's layout, with
    the image size and preprocessing stored with the checkpoint (a run's, or timm-to-orbax's)."""
    params = train_checkpoint.restore_params(checkpoint_path, step=step)
    preprocessing = finetune.preprocessing_from_meta(
        train_checkpoint.read_meta(checkpoint_path, step))
    return _save_timm(params, out_path, model, checkpoint_path, preprocessing)


def main(argv) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"Usage: python -m mixer_jax.convert {{{'|'.join(COMMANDS)}}} "
                             "--out=... (--npz=... | --checkpoint=... [--step=N] | --timm=...) "
                             "[--model=NAME]")
    if not FLAGS.out:
        raise app.UsageError("--out is required.")
    sources = {"npz": ("--npz", FLAGS.npz), "orbax": ("--checkpoint", FLAGS.checkpoint),
               "timm": ("--timm", FLAGS.timm)}
    flag, source = sources[argv[1].split("-to-")[0]]
    if not source:
        raise app.UsageError(f"{argv[1]} needs {flag}.")
    out, model, step, scan = FLAGS.out, FLAGS.model, FLAGS.step, FLAGS.scan
    overwrite = FLAGS.overwrite
    if not overwrite:  # every command: refused before anything is read
        check_out(out, overwrite)
    commands = {
        "npz-to-orbax": lambda: npz_to_orbax(source, out, scan=scan, overwrite=overwrite),
        "orbax-to-npz": lambda: orbax_to_npz(source, out, step=step, overwrite=overwrite),
        "timm-to-npz": lambda: timm_to_npz(source, out, model=model),
        "timm-to-orbax": lambda: timm_to_orbax(source, out, model=model, scan=scan,
                                               overwrite=overwrite),
        "npz-to-timm": lambda: npz_to_timm(source, out, model=model),
        "orbax-to-timm": lambda: orbax_to_timm(source, out, model=model, step=step),
    }
    commands[argv[1]]()


if __name__ == "__main__":
    cli.run(main, flag_values=FLAGS)
