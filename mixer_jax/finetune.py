"""Fine-tuning from pre-trained parameters, for every registered model family.

What a parameter tree is comes from the registry (`Family.architecture` read from
its shapes, `Family.variants` for a name); which arrays follow the class count
from `Family.classifier`; which axes count tokens from the logical axes the
family declares on its parameters ("tokens", `models.param_axes`). No family's
key names appear here.

- `read_source(source)`: a pre-trained source resolved once: a parameter tree, a
  published-format `.npz`, or an orbax checkpoint directory (a workdir, its
  checkpoints directory or one step); readers for other formats (timm files,
  Hugging Face snapshots) plug in with `register_reader`.
- `load_pretrained(source, init_params, ...)`: parameters for a new model (head
  reset, token mixing adapted to a new image size, see `mixer_jax.resolution`).
- `adapted_model_overrides(source, image_size)`: the architecture fields a source
  needs at an image size (e.g. the widened `tokens_mlp_dim` of the block-diagonal
  method for Mixer; nothing for a square token map).
- `identify(flat)`: (family, architecture fields) of flat parameters.

Token mixing: parameters under one Flax module (the same key up to the last "/")
form a unit; in a unit where any parameter has a "tokens" axis, "tokens" axes are
token axes and "mlp" axes the token MLP's hidden width (widened tile-major by the
block-diagonal method). The token stride (pixels per token side) is measured on
the family's module, so a new image size gives the new grid.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from mixer_jax import checkpoint, models, resolution
from mixer_jax.checkpoint import SEP, CheckpointError, flatten_params, unflatten_params
from mixer_jax.models import registry

PathLike = str | os.PathLike
Params = Mapping[str, Any]
ImageSize = int | tuple[int, int]

TOKEN_MIXING_METHODS = ("auto", "block_diagonal", "resample", "reinit")

_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
    """A pre-trained source, read once: flat per-block parameters and what came with them."""

    flat: dict[str, Any]  # "a/b/c" -> array, per-block layout
    name: str  # for messages: repr(path) or "The given parameters"
    preprocessing: registry.Preprocessing | None = None  # what the weights expect, if known
    model_name: str | None = None  # a registered name, when the source says (e.g. timm's)


def _is_timm(source) -> bool:
    from mixer_jax import timm_weights  # noqa: PLC0415  (it imports this module's parent)

    return timm_weights.is_timm_source(source)


def _read_timm(source) -> Source:
    from mixer_jax import timm_weights  # noqa: PLC0415

    weights = timm_weights.read_timm(source)
    return Source(flatten_params(weights.params), weights.source, weights.preprocessing,
                  weights.name)


# (matches(path) -> bool, read(path) -> Source), tried in order before npz and orbax.
_READERS: list[tuple[Callable[[str], bool], Callable[[str], Source]]] = [(_is_timm, _read_timm)]


def register_reader(matches: Callable[[str], bool], read: Callable[[str], Source]) -> None:
    """Adds a reader for another kind of source (e.g. `.safetensors`, `hf-hub:` ids):
    `read_source` calls `read(path)` for the first reader whose `matches(path)` is true."""
    _READERS.append((matches, read))


def preprocessing_from_meta(meta: Mapping[str, Any] | None) -> registry.Preprocessing | None:
    """The `Preprocessing` stored in a run checkpoint's meta (`train_checkpoint.run_meta`)."""
    stored = (meta or {}).get("preprocessing")
    if not stored:
        return None
    return registry.Preprocessing(**{k: tuple(v) if isinstance(v, list) else v
                                     for k, v in stored.items()})


def _reader(path: str):
    return next((read for matches, read in _READERS if matches(path)), None)


def has_reader(path: str) -> bool:
    """Whether a registered reader takes `path` (e.g. an `hf-hub:` id that is no file)."""
    return _reader(path) is not None


def is_orbax(path: str) -> bool:
    """Whether `read_source(path)` reads an orbax checkpoint directory."""
    from etils import epath  # noqa: PLC0415

    return _reader(path) is None and epath.Path(path).is_dir()


def read_source(source: PathLike | Params | Source) -> Source:
    """Resolves a pre-trained source once: a parameter tree (either layout), an `.npz`
    (local or any tf.io.gfile path), an orbax checkpoint directory, timm weights (a
    state dict, `.safetensors`/`.pth`, a Hub snapshot folder or an `hf-hub:` id, via
    `timm_weights.read_timm`), or anything a registered reader takes."""
    if isinstance(source, Source):
        return source
    if isinstance(source, Mapping) and _is_timm(source):
        return _read_timm(source)
    if isinstance(source, Mapping):
        name = "The given parameters"
        return Source(checkpoint._normalise_layout(flatten_params(source), name), name)
    path = os.fspath(source)
    read = _reader(path)
    if read is not None:
        return read(path)
    if is_orbax(path):
        from mixer_jax import train_checkpoint  # noqa: PLC0415

        try:
            params = train_checkpoint.restore_params(path)
            meta = train_checkpoint.read_meta(path)
        except CheckpointError:
            raise  # already names the checkpoint
        except (FileNotFoundError, ValueError) as e:
            raise CheckpointError(f"{path!r}: {e}") from e
        return Source(flatten_params(params), repr(path), preprocessing_from_meta(meta),
                      (meta or {}).get("model_name"))
    return Source(flatten_params(checkpoint.load_npz(path)), repr(path))


# -------------------------------------------------------------------- what it is


def identify(flat: Mapping[str, Any], name: str = "The parameters") -> tuple[registry.Family, dict]:
    """(family, architecture fields) of flat per-block parameters, by asking each family."""
    for family_name in models.list_families():
        family = models.get_family(family_name)
        try:
            return family, dict(family.architecture(flat))
        except (KeyError, ValueError, IndexError, TypeError, AttributeError):
            continue
    raise CheckpointError(
        f"{name} is not a checkpoint of any registered model family "
        f"({', '.join(models.list_families())}); found e.g. {sorted(flat)[:4]}.")


@dataclasses.dataclass(frozen=True)
class _Layout:
    """A family's parameters at some architecture: axes, token roles and stride."""

    axes: dict[str, tuple]  # flat key -> logical axes
    shapes: dict[str, tuple[int, ...]]  # at the image size below
    roles: dict[str, tuple]  # token-unit keys -> per-axis role (resolution.Roles)
    stride: int | None  # pixels per token along a side; None: no token axes
    token_fields: tuple[str, ...]  # architecture fields that the block-diagonal method widens


def module_fields(family: registry.Family, fields: Mapping[str, Any]) -> dict:
    """Module fields for architecture `fields`: those of the family's variant they match
    (e.g. gMixer's `gated`, which shapes do not show), else of its first, with `fields`
    on top."""
    base = next((v for v in family.variants.values()
                 if all(fields.get(k) == x for k, x in v.items() if k in fields)),
                next(iter(family.variants.values())))
    return {**base, **fields}


def _abstract(family: registry.Family, fields: dict, size: int):
    model = family.module(**{**module_fields(family, fields), "num_classes": 1})
    shape = (size, size, 3)
    axes = models.param_axes(model, shape)
    flat_axes = {SEP.join(str(k.key) for k in path): v for path, v in
                 jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))}
    shapes = {k: tuple(v.shape) for k, v in flatten_params(models.param_shapes(model, shape)).items()}
    return flat_axes, shapes


def _token_roles(flat_axes: Mapping[str, tuple]) -> dict[str, tuple]:
    units = {k.rsplit(SEP, 1)[0] for k, axes in flat_axes.items() if "tokens" in axes}
    return {k: tuple("tokens" if a == "tokens" else "hidden" if a == "mlp" else None for a in axes)
            for k, axes in flat_axes.items() if k.rsplit(SEP, 1)[0] in units}


def _fake(shapes: Mapping[str, tuple]) -> dict[str, np.ndarray]:
    """Zero-stride arrays of these shapes (for `Family.architecture`, which reads shapes)."""
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


@functools.lru_cache(maxsize=32)
def _layout_cached(family_name: str, fields: tuple) -> _Layout:
    family, fields = models.get_family(family_name), dict(fields)
    sizes = (family.preprocessing.input_size, 224, 256, 192, 384, 448, 96)
    error = None
    for size in sizes:
        try:
            flat_axes, shapes = _abstract(family, fields, size)
            break
        except ValueError as e:  # the image size does not fit this architecture
            error = e
    else:
        raise CheckpointError(f"Cannot build {family.name} with {fields}: {error}")
    roles = _token_roles(flat_axes)
    stride, token_fields = None, ()
    if roles:
        key, axis = next((k, r.index("tokens")) for k, r in roles.items() if "tokens" in r)
        side = math.isqrt(shapes[key][axis])
        stride = size // side if side * side == shapes[key][axis] and size % side == 0 else None
        grid = (side, side)
        wide = {k: (resolution.adapted_shape(s, roles[k], grid, (2 * side, 2 * side),
                                             "block_diagonal") if k in roles else s)
                for k, s in shapes.items()}
        wide_fields = family.architecture(_fake(wide))
        token_fields = tuple(f for f in fields if wide_fields.get(f) != fields[f])
    return _Layout(flat_axes, shapes, roles, stride, token_fields)


def layout(family: registry.Family, fields: dict) -> _Layout:
    """The family's parameters at these architecture fields: logical axes, token roles,
    token stride and the fields the block-diagonal method widens (computed abstractly)."""
    hashable = lambda v: tuple(v) if isinstance(v, list) else v
    return _layout_cached(family.name, tuple((k, hashable(v)) for k, v in fields.items()))


def describe(family: registry.Family, fields: Mapping[str, Any],
             token_fields: tuple[str, ...] = ()) -> str:
    """'Mixer-B_16', 'Mixer-B_16 with tokens_mlp_dim 1536', or 'a custom Mixer (...)'."""
    fallback = None
    for variant, known in family.variants.items():
        if any(fields.get(k) != v for k, v in known.items() if k not in token_fields):
            continue
        widened = [k for k in token_fields if k in known and fields.get(k) != known[k]]
        if not widened:
            return variant
        fallback = fallback or (f"{variant} with "
                                + ", ".join(f"{k} {fields[k]}" for k in widened))
    return fallback or (f"a custom {family.name.capitalize()} ("
                        + ", ".join(f"{k} {v}" for k, v in fields.items()) + ")")


def _is_classifier(family: registry.Family, key: str) -> bool:
    return any(key == p or key.startswith(p + SEP) for p in family.classifier)


# --------------------------------------------------------------------- token grids


def _image_grid(image_size: ImageSize, stride: int) -> resolution.Grid:
    """The (rows, columns) token grid of an image size (int for square images)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if height % stride or width % stride:
        raise CheckpointError(f"Image size {height}x{width} is not a multiple of the patch "
                              f"size {stride}.")
    return height // stride, width // stride


def _grid(image_size: ImageSize | None, stride: int, num_tokens: int,
          what: str) -> resolution.Grid:
    """Token grid from an image size, or the square grid of `num_tokens`."""
    if image_size is None:
        try:
            return resolution.square_grid(num_tokens)
        except ValueError:
            raise CheckpointError(
                f"{what} has {num_tokens} tokens, not a square patch grid; pass its image "
                "size (height, width)."
            ) from None
    grid = _image_grid(image_size, stride)
    if grid[0] * grid[1] != num_tokens:
        raise CheckpointError(
            f"{what} has {num_tokens} tokens, but an image of size {image_size} has "
            f"{grid[0]}x{grid[1]} = {grid[0] * grid[1]} patches of {stride} pixels."
        )
    return grid


def num_tokens(flat, layout: _Layout) -> int:
    """The token count of flat parameters (the size of their first token axis)."""
    roles = layout.roles
    key, axis = next((k, r.index("tokens")) for k, r in sorted(roles.items()) if "tokens" in r)
    return flat[key].shape[axis]


@dataclasses.dataclass(frozen=True)
class _Plan:
    method: str  # copy | block_diagonal | resample | reinit
    source_grid: resolution.Grid | None = None
    target_grid: resolution.Grid | None = None


def _plan(method: str, layout: _Layout, num_tokens: int, source_image_size,
          target_grid_of) -> _Plan:
    """Chooses how token mixing is carried over (see `load_pretrained`)."""
    if method not in TOKEN_MIXING_METHODS:
        raise ValueError(f"token_mixing must be one of {TOKEN_MIXING_METHODS}, got {method!r}.")
    if not layout.roles:
        return _Plan("copy")
    if method == "reinit":
        return _Plan("reinit")
    source = _grid(source_image_size, layout.stride, num_tokens, "The file")
    target = target_grid_of(source)
    factors = resolution.tile_factors(source, target)
    if method == "auto":
        method = "copy" if source == target else "block_diagonal" if factors else "resample"
    if method == "block_diagonal" and factors is None:
        raise CheckpointError(
            f"Block-diagonal adaptation needs a patch grid larger by integer factors; the "
            f"file's grid is {source[0]}x{source[1]}, the model's {target[0]}x{target[1]}. "
            "Use token_mixing='resample'."
        )
    return _Plan(method, source, target)


def _adapted_shapes(shapes: Mapping[str, tuple], layout: _Layout, plan: _Plan) -> dict:
    if plan.method in ("copy", "reinit"):
        return dict(shapes)
    return {k: (resolution.adapted_shape(s, layout.roles[k], plan.source_grid, plan.target_grid,
                                         plan.method) if k in layout.roles else s)
            for k, s in shapes.items()}


def _source_layout(source: PathLike | Params | Source):
    src = read_source(source)
    family, fields = identify(src.flat, src.name)
    return src, family, fields, layout(family, fields)


def adapted_model_overrides(source: PathLike | Params | Source, image_size: ImageSize, *,
                            token_mixing: str = "auto",
                            source_image_size: ImageSize | None = None) -> dict:
    """The architecture fields of `source`'s family for fine-tuning it at `image_size`.

    E.g. a Mixer-B_16 file at image_size=448 (integer factor 2, block-diagonal
    method) needs tokens_mlp_dim = 4 * 384. Use as
    `models.create_model(name, num_classes=..., **adapted_model_overrides(path, 448))`.
    `token_mixing` and `source_image_size` as in `load_pretrained`.
    """
    src, family, fields, layout = _source_layout(source)
    if not layout.roles:
        return fields
    grid = _image_grid(image_size, layout.stride)
    plan = _plan("resample" if token_mixing == "reinit" else token_mixing, layout,
                 num_tokens(src.flat, layout), source_image_size, lambda _: grid)
    shapes = {k: tuple(v.shape) for k, v in src.flat.items()}
    return dict(family.architecture(_fake(_adapted_shapes(shapes, layout, plan))))


def token_width_overrides(source: PathLike | Params | Source, image_size: ImageSize, *,
                          token_mixing: str = "auto") -> dict:
    """Only the fields of `adapted_model_overrides` that token mixing sets (e.g. Mixer's
    `tokens_mlp_dim`; none for a square token map): what a model built by name needs."""
    src, family, fields, layout = _source_layout(source)
    adapted = adapted_model_overrides(src, image_size, token_mixing=token_mixing)
    return {f: adapted[f] for f in layout.token_fields}


# ------------------------------------------------------------------------ checks


def _check_architecture(family, file_flat, model_flat, file_fields, model_fields, layout,
                        name: str) -> None:
    """Same architecture apart from token-mixing widths, or an error saying which is which."""
    differences = [f"{f} {file_fields[f]} vs {model_fields.get(f)}" for f in file_fields
                   if f not in layout.token_fields and file_fields[f] != model_fields.get(f)]
    if not differences:
        return
    fixed = lambda k: not (_is_classifier(family, k) or k in layout.roles)
    # Convolution kernels (a stem) first: their shapes alone tell patch size and width apart.
    keys = sorted(model_flat, key=lambda k: ("kernel" not in layout.axes.get(k, ()), k))
    mismatch = next((f"{k!r} has shape {tuple(file_flat[k].shape)} in the file, the model "
                     f"expects {tuple(model_flat[k].shape)}" for k in keys
                     if fixed(k) and k in file_flat and file_flat[k].shape != model_flat[k].shape),
                    None)
    mismatch = mismatch or next(
        (f"{k!r} (shape {tuple(model_flat[k].shape)}) is missing from the file" for k in keys
         if fixed(k) and k not in file_flat), None)
    mismatch = mismatch or next(
        (f"{k!r} is in the file but not in the model" for k in sorted(file_flat)
         if fixed(k) and k not in model_flat), "the shapes differ")
    raise CheckpointError(
        f"{name} does not fit the model: {mismatch}. This file is "
        f"{describe(family, file_fields, layout.token_fields)}, the model is "
        f"{describe(family, model_fields, layout.token_fields)} (file vs model: "
        f"{', '.join(differences)}). Build the model with the file's architecture or load a "
        "checkpoint of the model's variant."
    )


def _head_from_file(family, file_flat, model_flat, reset_head: bool | None, name: str) -> bool:
    keys = sorted(k for k in model_flat if _is_classifier(family, k))
    if not keys or not all(k in file_flat for k in keys) or reset_head:
        return False
    differ = [k for k in keys if file_flat[k].shape != model_flat[k].shape]
    if not differ:
        return True
    key = next((k for k in differ if len(model_flat[k].shape) > 1), differ[0])
    file_classes, model_classes = file_flat[key].shape[-1], model_flat[key].shape[-1]
    if reset_head is None:
        _log.info("Replacing the head: %d classes in %s, %d in the model.",
                  file_classes, name, model_classes)
        return False
    raise CheckpointError(
        f"{key!r}: the model expects shape {tuple(model_flat[key].shape)}, {name} has "
        f"{tuple(file_flat[key].shape)}: the file has a {file_classes}-class head, the model "
        f"{model_classes} classes. Pass reset_head=None or True to start from the model's "
        "own head."
    )


def _check_token_widths(family, plan: _Plan, layout: _Layout, file_flat, model_flat,
                        file_fields, model_fields, name: str) -> None:
    if plan.method == "reinit":
        return
    file_shapes = {k: tuple(file_flat[k].shape) for k in layout.roles if k in file_flat}
    adapted = _adapted_shapes(file_shapes, layout, plan)
    # Kernels with token axes first: their shapes show both the grid and the width.
    order = lambda k: (not ("tokens" in layout.roles[k] and len(layout.roles[k]) > 1), k)
    key = next((k for k in sorted(adapted, key=order)
                if k in model_flat and adapted[k] != tuple(model_flat[k].shape)), None)
    if key is None:
        return
    needed = dict(family.architecture(_fake(
        {**{k: tuple(v.shape) for k, v in file_flat.items()}, **adapted})))
    widths = [f for f in layout.token_fields if needed.get(f) != model_fields.get(f)]
    if plan.method == "copy":
        cause = (f"the token MLP widths differ: this file is "
                 f"{describe(family, file_fields, layout.token_fields)}, the model is "
                 f"{describe(family, model_fields, layout.token_fields)}. Build the model with "
                 + ", ".join(f"{f}={needed[f]}" for f in widths) + ".")
    else:
        (h, w), (big_h, big_w) = plan.source_grid, plan.target_grid
        cause = (
            f"the file was trained on a {h}x{w} patch grid and the model uses {big_h}x{big_w}; "
            f"the {plan.method} method needs "
            + ", ".join(f"{f}={needed[f]} (the model has {model_fields.get(f)})" for f in widths)
            + ". Build the model with create_model(..., **checkpoint.adapted_model_overrides("
            f"path, image_size, token_mixing={plan.method!r}))"
            + (" or pass token_mixing='resample' to keep the widths."
               if plan.method == "block_diagonal" else ".")
        )
    raise CheckpointError(
        f"{key!r}: the model expects shape {tuple(model_flat[key].shape)}, {name} has "
        f"{tuple(file_flat[key].shape)}: {cause}"
    )


def _check_keys(family, layout, file_flat, model_flat, take_from_file, name: str) -> None:
    """Every key the model takes from the file exists there with the model's shape."""
    for key, value in model_flat.items():
        if not take_from_file(key):
            continue
        if key not in file_flat:
            raise CheckpointError(f"{name} has no {key!r} (the model expects shape "
                                  f"{tuple(value.shape)}): the file is incomplete or comes "
                                  "from a different model definition.")
        if key not in layout.roles and file_flat[key].shape != value.shape:
            raise CheckpointError(f"{key!r}: the model expects shape {tuple(value.shape)}, "
                                  f"{name} has {tuple(file_flat[key].shape)}: the file comes "
                                  "from a different model definition.")
    for key in file_flat:
        if key not in model_flat and not _is_classifier(family, key):
            raise CheckpointError(
                f"{name} has {key!r} (shape {tuple(file_flat[key].shape)}), which the model "
                "does not have: the file comes from a different model definition."
            )


def _check_token_shapes(file_flat, layout: _Layout, num_tokens: int, name: str) -> None:
    """The file's token-mixing arrays agree with each other (and its architecture)."""
    for key, roles in sorted(layout.roles.items()):
        if key not in file_flat:
            continue
        expected = tuple(num_tokens if r == "tokens" else s
                         for s, r in zip(layout.shapes[key], roles))
        if tuple(file_flat[key].shape) != expected:
            raise CheckpointError(
                f"{name}: {key!r} has shape {tuple(file_flat[key].shape)}, inconsistent with "
                f"the rest of its token mixing ({num_tokens} tokens, so {expected}): the file "
                "is corrupt or was edited."
            )


def _adapt_tokens(file_flat, plan: _Plan, layout: _Layout) -> dict[str, Any]:
    """The token-unit arrays of the file, adapted by `plan`."""
    adapt = {"block_diagonal": resolution.block_diagonal_array,
             "resample": resolution.resample_array}.get(plan.method)
    return {key: adapt(np.asarray(jax.device_get(file_flat[key])), roles, plan.source_grid,
                       plan.target_grid)
            for key, roles in layout.roles.items() if key in file_flat and adapt}


# ----------------------------------------------------------------------- loading


def load_pretrained(source: PathLike | Params | Source, init_params: Params, *,
                    reset_head: bool | None = None, token_mixing: str = "auto",
                    image_size: ImageSize | None = None,
                    source_image_size: ImageSize | None = None) -> dict:
    """Parameters for a new model of any registered family, from a pre-trained source.

    Args:
      source: anything `read_source` takes (a path of a published-format `.npz`, an
        orbax checkpoint directory, a nested parameter dict, a `Source`).
      init_params: the new model's freshly initialised parameters, per-block or
        scanned layout. The result has exactly their structure, shapes and dtypes
        (numpy arrays on the host; place them on devices yourself).
      reset_head: None (default): keep the file's classifier if its class count
        matches the model's, else take the model's from `init_params`. True: always
        take the model's. False: require the file's to fit. A model without a
        classifier (`num_classes=None`) ignores the file's.
      token_mixing: how parameters with token axes are carried over when the token
        grid differs (see `mixer_jax.resolution` for both schemes):
        "auto" (default): unchanged grid -> copied; grid larger by integer factors
          (e.g. 224 -> 448) -> "block_diagonal"; any other grid -> "resample".
        "block_diagonal": the paper's method; a token MLP's model must be built
          with its hidden width times kh*kw (see `adapted_model_overrides`).
        "resample": resize over the patch grid; widths unchanged.
        "reinit": keep `init_params`' token-mixing parameters (the rest loaded).
      image_size: the new model's image size (int or (height, width)); only needed
        when its token grid is not square. Default: square grid from init_params.
      source_image_size: the pre-training image size, if not square.

    Raises:
      CheckpointError naming the key, expected and found shapes and the likely
      cause (e.g. "this file is Mixer-L_16, the model is Mixer-B_16") for any
      mismatch other than those adapted above.
    """
    if set(init_params) == {"params"}:  # a Flax variables dict: answer in kind
        return {"params": load_pretrained(
            source, init_params["params"], reset_head=reset_head, token_mixing=token_mixing,
            image_size=image_size, source_image_size=source_image_size)}
    src, family, file_fields, layout = _source_layout(source)
    file_flat, name = src.flat, src.name
    model_flat = flatten_params(init_params)
    model_family, model_fields = identify(model_flat, "The model")
    if model_family is not family:
        raise CheckpointError(
            f"{name} does not fit the model: this file is "
            f"{describe(family, file_fields)} ({family.name}), the model is "
            f"{describe(model_family, model_fields)} ({model_family.name}). Build a "
            f"{family.name} model or load a {model_family.name} checkpoint.")
    _check_architecture(family, file_flat, model_flat, file_fields, model_fields, layout, name)

    file_tokens = num_tokens(file_flat, layout) if layout.roles else 0

    def target_grid_of(source_grid):
        model_tokens = num_tokens(model_flat, layout)
        if model_tokens == file_tokens and image_size is None:
            return source_grid
        return _grid(image_size, layout.stride, model_tokens, "The model")

    plan = _plan(token_mixing, layout, file_tokens, source_image_size, target_grid_of)
    if plan.method != "reinit":
        _check_token_shapes(file_flat, layout, file_tokens, name)
    _check_token_widths(family, plan, layout, file_flat, model_flat, file_fields, model_fields,
                        name)
    head_from_file = _head_from_file(family, file_flat, model_flat, reset_head, name)

    def take_from_file(key: str) -> bool:
        if _is_classifier(family, key):
            return head_from_file
        return plan.method != "reinit" or key not in layout.roles

    _check_keys(family, layout, file_flat, model_flat, take_from_file, name)
    adapted = {} if plan.method == "reinit" else _adapt_tokens(file_flat, plan, layout)
    _log.info("Loaded %s into a %s model (head %s, token mixing: %s).", name,
              describe(family, model_fields, layout.token_fields),
              "from the file" if head_from_file else "from init_params", plan.method)

    out = {}
    for key, init in model_flat.items():
        value = adapted.get(key, file_flat.get(key)) if take_from_file(key) else init
        out[key] = np.asarray(jax.device_get(value)).astype(init.dtype, copy=False)
    return jax.device_get(registry.stacked_like(unflatten_params(out), init_params))
