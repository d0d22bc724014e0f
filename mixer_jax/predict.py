"""Classify image files with a Mixer checkpoint; prints the top-k classes.

  python -m mixer_jax.predict --checkpoint=Mixer-B_16.npz [--variant=Mixer-B_16] \\
      [--labels=imagenet2012|<tfds name>|<image folder>|<names.txt>] [--top_k=5] \\
      img1.jpg img2.png ...

The architecture, class count and image size are read from the checkpoint's
shapes (`--variant` is checked against them). Images of any size, format and
colour mode (grayscale, RGBA, palette, 16-bit) are turned upright (EXIF), made
RGB and preprocessed as the published checkpoints were evaluated: shorter side
resized to crop * 256/224, centre crop, values in [-1, 1]
(`input_pipeline.preprocess_for_eval`). Files are read in parallel and run in
batches of `--batch`. An unreadable file is reported and skipped; the exit
status is then 1. Class names: `--labels`, else those a training run stored with
its checkpoints (folder names, tfds label names), else ImageNet-1k's for a
1000-class head. A bad checkpoint or flag prints one line and exits with status 2
(`mixer_jax.cli`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from etils import epath
from flax.traverse_util import flatten_dict
from PIL import Image, ImageOps

from mixer_jax import checkpoint as ckpt
from mixer_jax import cli, host_memory, input_pipeline, labels, models, steps, train_config
from mixer_jax.errors import UserError

class PredictError(UserError, ValueError):
    """A bad checkpoint path, image file or model choice, explained."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model with its parameters and the image side it expects."""

    model: models.MlpMixer
    params: dict
    image_size: int


def _load_orbax(path: epath.Path) -> dict:
    """The `params` item of an orbax checkpoint, given the item itself, a step
    directory, or a checkpoint/work directory (its newest complete step)."""
    from mixer_jax import train_checkpoint  # orbax: only when needed

    if path.name == "params":
        path = path.parent
    try:
        return models.unstack_blocks(train_checkpoint.restore_params(str(path)))
    except (FileNotFoundError, ValueError) as e:
        raise PredictError(str(e)) from e


def load_params(checkpoint: str) -> dict:
    """Per-block numpy parameters from a published-layout `.npz` (local or gs://) or
    an orbax checkpoint directory."""
    path = epath.Path(checkpoint)
    if not path.exists():
        raise PredictError(f"Checkpoint {checkpoint!r} does not exist.")
    if path.is_dir():
        return _load_orbax(path)
    return ckpt.load_npz(checkpoint)


def load_model(checkpoint: str, *, variant: str | None = None, dtype: Any = jnp.float32,
               image_size: int | None = None) -> LoadedModel:
    """Loads `checkpoint` and builds the model its shapes describe.

    `variant`, when given, must match the file. The image size is the one the
    token-mixing weights were trained for (a square grid of patches) unless
    `image_size` is given (it must give the same number of patches).
    """
    params = load_params(checkpoint)
    arch = ckpt.architecture(params)
    if variant is not None:
        wanted = variant.replace("/", "_")
        if wanted not in models.VARIANTS:
            raise PredictError(f"Unknown variant {variant!r}; known: "
                               f"{', '.join(models.VARIANTS)}.")
        fields = arch.model_fields()
        # The token MLP width aside: fine-tuning at a higher resolution may widen it.
        if any(fields[k] != v for k, v in models.VARIANTS[wanted].items()
               if k != "tokens_mlp_dim"):
            raise PredictError(f"Checkpoint {checkpoint!r} is {arch.name}, not {wanted}.")
    side = math.isqrt(arch.num_tokens)
    size = image_size or side * arch.patch_size
    if size % arch.patch_size or (size // arch.patch_size) ** 2 != arch.num_tokens:
        raise PredictError(f"Checkpoint {checkpoint!r} was trained on {arch.num_tokens} "
                           f"patches of {arch.patch_size}px, not a square image of side "
                           f"{size}; pass the image size it was trained at.")
    model = models.MlpMixer(**arch.model_fields(), num_classes=arch.num_classes, dtype=dtype)
    _check_shapes(params, model, size, checkpoint)
    return LoadedModel(model, jax.tree.map(jnp.asarray, params), size)


def _check_shapes(params: dict, model: models.MlpMixer, size: int, checkpoint: str) -> None:
    """Every key present with the model's shape, nothing extra."""
    expected = flatten_dict(models.param_shapes(model, (size, size, 3)), sep="/")
    found = flatten_dict(params, sep="/")
    for key in sorted(set(expected) | set(found)):
        want = expected[key].shape if key in expected else None
        got = np.shape(found[key]) if key in found else None
        if want != got:
            raise PredictError(f"Checkpoint {checkpoint!r}, key {key!r}: the model expects "
                               f"shape {want}, the file has {got}.")


def load_image(path: str) -> np.ndarray:
    """Reads an image file as uint8 RGB [height, width, 3], upright per its EXIF tag."""
    try:
        with epath.Path(path).open("rb") as f, Image.open(f) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grayscale
                scaled = np.asarray(image, np.float64) / 257
                image = Image.fromarray(np.clip(scaled.round(), 0, 255).astype(np.uint8))
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise PredictError(f"Cannot read image {path!r}: {e}") from e


def prepare_image(path: str, image_size: int, resize: int | None) -> np.ndarray:
    """File -> float32 [image_size, image_size, 3] in [-1, 1], as the checkpoints expect."""
    resize = train_config.eval_resize(image_size) if resize is None else resize
    image = input_pipeline.preprocess_for_eval(load_image(path), image_size, resize=resize)
    return np.asarray(image, np.float32)


@functools.lru_cache(maxsize=8)
def _probabilities_fn(model: models.MlpMixer, microbatch: int | None):
    return jax.jit(lambda p, x: jax.nn.softmax(
        steps.forward(model, p, x, microbatch=microbatch).astype(jnp.float32), axis=-1))


def probabilities(loaded: LoadedModel, images: np.ndarray, *,
                  microbatch: int | None = None) -> np.ndarray:
    """Class probabilities [batch, num_classes] for preprocessed images, computed
    `microbatch` images at a time when given (`steps.forward`)."""
    if loaded.model.num_classes is None:
        raise PredictError("This checkpoint has no classification head (a feature "
                           "extractor); there are no classes to predict.")
    return np.asarray(_probabilities_fn(loaded.model, microbatch)(loaded.params, images))


def predict_files(paths: list[str], loaded: LoadedModel, *, top_k: int = 5,
                  batch_size: int = 32, microbatch: int | None = None,
                  resize: int | None = None, label_names: list[str] | None = None,
                  progress: bool = False) -> list[dict[str, Any]]:
    """Top-k predictions for each file, in order: {'path', 'top': [{'class', 'label',
    'probability'}]} or {'path', 'error'} for a file that cannot be read.

    Every batch is padded to `batch_size`, so the model compiles once; `microbatch`
    (which must divide it) computes each batch in pieces.
    """
    if microbatch is not None and (microbatch < 1 or batch_size % microbatch):
        raise PredictError(f"--microbatch={microbatch} does not divide --batch={batch_size}.")
    results: list[dict[str, Any]] = []
    with concurrent.futures.ThreadPoolExecutor() as pool:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            images = []
            for path, future in [(p, pool.submit(prepare_image, p, loaded.image_size, resize))
                                 for p in chunk]:
                try:
                    images.append((path, future.result()))
                except PredictError as e:
                    results.append({"path": path, "error": str(e)})
            if images:
                batch = np.zeros((batch_size, loaded.image_size, loaded.image_size, 3), np.float32)
                batch[:len(images)] = [image for _, image in images]
                probs = probabilities(loaded, batch, microbatch=microbatch)[:len(images)]
                for (path, _), p in zip(images, probs):
                    top = np.argsort(-p, kind="stable")[:top_k]
                    results.append({"path": path, "top": [
                        {"class": int(c), "probability": float(p[c]),
                         "label": label_names[c] if label_names else None} for c in top]})
            if progress:
                print(f"predicted {min(start + batch_size, len(paths))}/{len(paths)} files",
                      file=sys.stderr, flush=True)
    order = {path: i for i, path in enumerate(paths)}
    return sorted(results, key=lambda r: order[r["path"]])


def format_predictions(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['path']}: error: {r['error']}")
            continue
        lines.append(r["path"])
        for t in r["top"]:
            name = f"class {t['class']}" if t["label"] is None else f"{t['label']} ({t['class']})"
            lines.append(f"  {t['probability']:8.2%}  {name}")
    return "\n".join(lines)


def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("checkpoint", None, "A .npz (published layout) or an orbax "
                        "checkpoint directory.", flag_values=fv, required=True)
    flags.DEFINE_string("variant", None, "Expected variant, e.g. Mixer-B_16 (checked "
                        "against the file; read from it when omitted).", flag_values=fv)
    flags.DEFINE_string("labels", None, "Class names: imagenet2012, a tfds dataset name, an "
                        "image folder, or a text file (default: the names a training run "
                        "stored with its checkpoints, else ImageNet-1k names for a 1000-class "
                        "head).", flag_values=fv)
    flags.DEFINE_string("tfds_data_dir", None, "tfds data dir for --labels.", flag_values=fv)
    flags.DEFINE_integer("top_k", 5, "Classes shown per image.", flag_values=fv)
    flags.DEFINE_integer("batch", 32, "Images per model call.", flag_values=fv)
    flags.DEFINE_integer("microbatch", None, "Images per piece of a batch (default: the "
                         "whole batch at once; on CPUs 4-8 runs faster).", flag_values=fv)
    flags.DEFINE_integer("image_size", None, "Crop size (default: read from the "
                         "checkpoint).", flag_values=fv)
    flags.DEFINE_integer("resize", None, "Shorter side before the centre crop (default: "
                         "crop * 256/224 as in the paper; 0: resize straight to the crop).",
                         flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.",
                      flag_values=fv)
    flags.DEFINE_bool("json", False, "Print JSON instead of text.", flag_values=fv)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (1 if any file was unreadable)."""
    argv = sys.argv if argv is None else ["predict", *argv]
    fv = flags.FlagValues()
    define_flags(fv)
    if {"-h", "--help", "--helpfull"} & set(argv[1:]):
        print(__doc__ + "\nFlags:\n" + fv.get_help())
        return 0
    files = cli.parse_flags(argv, fv)[1:]
    if not files:
        raise PredictError("No image files given.")
    loaded = load_model(fv.checkpoint, variant=fv.variant, image_size=fv.image_size,
                        dtype=jnp.dtype(fv.dtype))
    names = (labels.label_names(fv.labels, loaded.model.num_classes, data_dir=fv.tfds_data_dir)
             if fv.labels else labels.checkpoint_names(fv.checkpoint, loaded.model.num_classes))
    if names is None:
        print(f"(no class names known for {fv.labels or 'this checkpoint'}'s "
              f"{loaded.model.num_classes} classes; --labels=<names.txt> gives them)",
              file=sys.stderr)
    results = predict_files(files, loaded, top_k=fv.top_k, batch_size=fv.batch,
                            microbatch=fv.microbatch, resize=fv.resize, label_names=names,
                            progress=len(files) > fv.batch)
    print(json.dumps(results, indent=2) if fv.json else format_predictions(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    host_memory.retain_freed_memory()
    cli.run(lambda argv: main(argv[1:]))
