"""Classify image files with a checkpoint of any registered model; prints the top-k classes.

  python -m mixer_jax.predict --checkpoint=Mixer-B_16.npz [--variant=Mixer-B_16] \\
      [--labels=imagenet2012|<tfds name>|<image folder>|<names.txt>] [--top_k=5] \\
      img1.jpg img2.png ...

The family, architecture, class count and image size are read from the
checkpoint's shapes through the model registry (`--variant` is checked against
them). Images of any size, format and colour mode (grayscale, RGBA, palette,
16-bit) are turned upright (EXIF), made RGB and preprocessed as the weights
expect (the preprocessing stored with a run's checkpoint, else the family's
default; Mixer: shorter side resized to crop * 256/224, centre crop, values in
[-1, 1]; `input_pipeline.preprocess_for_eval`). Files are read in parallel and run in
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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from etils import epath
from PIL import Image, ImageOps

from mixer_jax import cli, finetune, host_memory, input_pipeline, labels, models, steps
from mixer_jax.checkpoint import flatten_variables
from mixer_jax.errors import UserError


class PredictError(UserError, ValueError):
    """A bad checkpoint path, image file or model choice, explained."""


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model with its parameters (and constants), the image side it expects and how to
    preprocess."""

    model: nn.Module
    params: dict
    image_size: int
    preprocessing: models.Preprocessing = models.registry.INCEPTION
    constants: dict = dataclasses.field(default_factory=dict)  # e.g. RandFormer's "frozen"

    @property
    def variables(self) -> dict:
        return models.as_variables(self.params, self.constants)


def _source(checkpoint: str) -> finetune.Source:
    """The checkpoint read once: an `.npz` (local or gs://), an orbax checkpoint (the
    `params` item itself, a step directory, or a checkpoint/work directory: its newest
    complete step), or anything a registered reader of `finetune.read_source` takes."""
    path = epath.Path(checkpoint)
    if path.name == "params" and path.is_dir():
        checkpoint = str(path.parent)
    elif not path.exists() and not finetune.has_reader(checkpoint):
        raise PredictError(f"Checkpoint {checkpoint!r} does not exist.")
    return finetune.read_source(checkpoint)


def load_params(checkpoint: str) -> dict:
    """Per-block numpy parameters of a checkpoint (see `_source`)."""
    return _source(checkpoint).variables["params"]


def _num_classes(family: models.Family, flat) -> int | None:
    """The classifier's output count (its kernel's last dimension), or None without one."""
    shapes = [flat[k].shape for k in sorted(flat)
              if any(k == p or k.startswith(p + "/") for p in family.classifier)]
    return max(shapes, key=len)[-1] if shapes else None


def load_model(checkpoint: str, *, variant: str | None = None, dtype: Any = jnp.float32,
               image_size: int | None = None) -> LoadedModel:
    """Loads `checkpoint` and builds the model its shapes describe (any registered family).

    `variant`, when given, must match the file. The image size is the one the token-mixing
    weights were trained for (a square grid of tokens) unless `image_size` is given (it
    must give the same number of tokens); models without a fixed token count take
    `image_size`, else the input size stored with the weights or the family's default.
    """
    source = _source(checkpoint)
    family, fields = finetune.identify(source.flat, repr(checkpoint), source.model_name)
    layout = finetune.layout(family, fields)
    name = finetune.describe(family, fields, layout.token_fields)
    if variant is not None:
        try:
            wanted_family = models.get_family(variant)
            known = wanted_family.variants[models.registry.canonical_name(variant)]
        except (ValueError, KeyError):
            raise PredictError(f"Unknown variant {variant!r}; `mixer_jax.models.list_models()` "
                               "lists every name.") from None
        # Token-mixing widths aside: fine-tuning at a higher resolution may widen them.
        if wanted_family is not family or any(
                fields.get(k) != v for k, v in known.items() if k not in layout.token_fields):
            raise PredictError(f"Checkpoint {checkpoint!r} is {name}, not "
                               f"{models.registry.canonical_name(variant)}.")
    preprocessing = source.preprocessing or family.preprocessing
    if layout.roles:
        tokens = finetune.num_tokens(source.flat, layout)
        side = math.isqrt(tokens)
        size = image_size or side * layout.stride
        if size % layout.stride or (size // layout.stride) ** 2 != tokens:
            raise PredictError(f"Checkpoint {checkpoint!r} was trained on {tokens} "
                               f"patches of {layout.stride}px, not a square image of side "
                               f"{size}; pass the image size it was trained at.")
    else:
        size = image_size or preprocessing.input_size
    build = dict(fields, num_classes=_num_classes(family, source.flat), dtype=dtype)
    build = build if source.model_name else finetune.module_fields(family, build)
    model_name = source.model_name or variant
    model = (models.create_model(model_name, **build) if model_name
             and models.get_family(model_name) is family else family.module(**build))
    _check_shapes(source.flat, model, size, checkpoint)
    params, constants = models.split_variables(jax.tree.map(jnp.asarray, source.variables))
    return LoadedModel(model, params, size, preprocessing, constants)


def _check_shapes(found: dict, model: nn.Module, size: int, checkpoint: str) -> None:
    """Every key (parameters and constants, flat) present with the model's shape, nothing
    extra."""
    expected = flatten_variables(models.variable_shapes(model, (size, size, 3)))[0]
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


def prepare_image(path: str, image_size: int, resize: int | None,
                  preprocessing: models.Preprocessing = models.registry.INCEPTION) -> np.ndarray:
    """File -> float32 [image_size, image_size, 3] normalised as the weights expect
    (`preprocessing`: mean/std; shorter side resized to image_size / crop_pct unless
    `resize` says otherwise)."""
    resize = round(image_size / preprocessing.crop_pct) if resize is None else resize
    image = input_pipeline.preprocess_for_eval(load_image(path), image_size, resize=resize,
                                               mean=preprocessing.mean, std=preprocessing.std)
    return np.asarray(image, np.float32)


@functools.lru_cache(maxsize=8)
def _probabilities_fn(model: nn.Module, microbatch: int | None):
    return jax.jit(lambda v, x: jax.nn.softmax(
        steps.forward(model, v, x, microbatch=microbatch).astype(jnp.float32), axis=-1))


def probabilities(loaded: LoadedModel, images: np.ndarray, *,
                  microbatch: int | None = None) -> np.ndarray:
    """Class probabilities [batch, num_classes] for preprocessed images, computed
    `microbatch` images at a time when given (`steps.forward`)."""
    if loaded.model.num_classes is None:
        raise PredictError("This checkpoint has no classification head (a feature "
                           "extractor); there are no classes to predict.")
    return np.asarray(_probabilities_fn(loaded.model, microbatch)(loaded.variables, images))


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
            for path, future in [(p, pool.submit(prepare_image, p, loaded.image_size, resize,
                                                 loaded.preprocessing))
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
