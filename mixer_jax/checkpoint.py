"""Published-format `.npz` checkpoints: reading, writing, and preparing for fine-tuning.

File format (Google's `gs://mixer_models/...` files): a flat, uncompressed npz of
float arrays whose keys join the Flax parameter path with "/" (never the OS path
separator), e.g. `MixerBlock_3/token_mixing/Dense_0/kernel`. An older layout
(`embedding`, `Mixer/encoder_norm`, `Mixer/encoderblock_{i}/{token,channel}_mixing_phase_0/
{kernel,bias}{1,2}`, possibly with extra singleton dimensions) is recognised from
its keys and converted to the Linen layout on load.

Local files are read and written directly; `gs://` (and any other `scheme://` file
system TensorFlow knows, e.g. `ram://`) goes through `tf.io.gfile`, the only use of
TensorFlow here (imported then). Files are
loaded with `allow_pickle=False`: loading never executes code. Every problem with
a file, or between a file and a model, raises `CheckpointError` naming the file,
the key, the shapes involved and the likely cause.

Public API:
- `load_npz(path)`: nested numpy parameters in the per-block Linen layout.
- `save_npz(params, path)`: writes the published layout, atomically.
- `load_pretrained(source, init_params, ...)`: parameters for a new model
  (head reset, token-mixing adapted to a new image size, see `mixer_jax.resolution`).
- `adapted_model_overrides(source, image_size)`: the model fields a file needs at a
  given image size (e.g. the widened `tokens_mlp_dim` of the block-diagonal method).
- `architecture(source)`: what a file (or parameter tree) is, e.g. "Mixer-B_16".
"""
from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import re
import types
import uuid
import zipfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from mixer_jax import models, resolution
from mixer_jax.errors import UserError

PathLike = str | os.PathLike
Params = Mapping[str, Any]
ImageSize = int | tuple[int, int]

SEP = "/"
TOKEN_MIXING_METHODS = ("auto", "block_diagonal", "resample", "reinit")
_HEAD = "head" + SEP
_TOKEN_MIXING = re.compile(rf"^{models.BLOCK_PREFIX}(\d+)/token_mixing/")
_BLOCK = re.compile(rf"^{models.BLOCK_PREFIX}(\d+)/")

_log = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or that does not fit the model."""


# ----------------------------------------------------------------------------- layout


def flatten_params(params: Params) -> dict[str, Any]:
    """Nested parameters (per-block or scanned layout) -> flat `{"stem/kernel": array, ...}`.

    The flat keys are those of the published files (per-block layout). A Flax
    variables dict `{"params": ...}` is accepted too.
    """
    if set(params) == {"params"}:
        params = params["params"]
    params = nn.meta.unbox(dict(params))  # `model.init` boxes parameters with their axis names
    return traverse_util.flatten_dict(models.unstack_blocks(params), sep=SEP)


def unflatten_params(flat: Mapping[str, Any]) -> dict:
    """Flat "/"-joined keys -> nested dict."""
    return traverse_util.unflatten_dict(dict(flat), sep=SEP)


_OLD_BLOCK = re.compile(r"^Mixer/encoderblock_(\d+)/(.*)$")
_OLD_MLP = re.compile(r"^(token|channel)_mixing_phase_0/(kernel|bias)([12])$")
_OLD_RENAMES = {"embedding": "stem", "Mixer/encoder_norm": "pre_head_layer_norm"}


def _is_old_layout(keys) -> bool:
    return any(k.startswith(("Mixer/", "embedding/")) for k in keys)


def _linen_key(old_key: str) -> str:
    """Older-layout key -> Linen-layout key (unknown keys pass through unchanged)."""
    match = _OLD_BLOCK.match(old_key)
    if match:
        block, rest = match.groups()
        mlp = _OLD_MLP.match(rest)
        if mlp:
            kind, param, index = mlp.groups()
            rest = f"{kind}_mixing/Dense_{int(index) - 1}/{param}"
        return f"{models.BLOCK_PREFIX}{block}/{rest}"
    for old, new in _OLD_RENAMES.items():
        if old_key.startswith(old + SEP):
            return new + old_key[len(old):]
    return old_key


def _expected_ndim(key: str) -> int:
    if key.endswith("kernel"):
        return 4 if key.startswith("stem/") else 2
    return 1


def _squeeze_to(key: str, array, ndim: int, source: str):
    """Drops singleton dimensions (first ones first) until `array` has `ndim` dims."""
    while array.ndim > ndim:
        ones = [axis for axis, size in enumerate(array.shape) if size == 1]
        if not ones:
            raise CheckpointError(f"{source}: array {key!r} has shape {tuple(array.shape)}; "
                                  f"expected {ndim} dimensions.")
        array = array.squeeze(ones[0])
    return array


def _normalise_layout(flat: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Either published layout -> the Linen layout (flat keys)."""
    # Tolerate files written with Windows path separators in their keys.
    flat = {key.replace("\\", SEP): value for key, value in flat.items()}
    if not _is_old_layout(flat):
        return flat
    linen = [k for k in flat if k.startswith(("stem/", models.BLOCK_PREFIX, "pre_head_layer_norm/"))]
    if linen:
        raise CheckpointError(
            f"{source} mixes the older layout ('Mixer/...', 'embedding/...') and the Linen "
            f"layout (e.g. {linen[0]!r}); a checkpoint uses one or the other."
        )
    renamed = {}
    for key, value in flat.items():
        new_key = _linen_key(key)
        renamed[new_key] = _squeeze_to(key, value, _expected_ndim(new_key), source)
    return renamed


# ------------------------------------------------------------------------ architecture


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What a parameter tree is, read from its shapes."""

    patch_size: int
    num_blocks: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    num_tokens: int  # S = patches per image at the training resolution
    num_classes: int | None  # None: no head

    def model_fields(self) -> dict[str, int]:
        """The five `MlpMixer` architecture fields."""
        return {name: getattr(self, name) for name in models.MODEL_FIELDS}

    @property
    def name(self) -> str:
        """'Mixer-B_16', 'Mixer-B_16 with tokens_mlp_dim 1536', or a field listing."""
        fields = self.model_fields()
        for variant, known in models.VARIANTS.items():
            if all(fields[k] == v for k, v in known.items() if k != "tokens_mlp_dim"):
                if fields["tokens_mlp_dim"] == known["tokens_mlp_dim"]:
                    return variant
                return f"{variant} with tokens_mlp_dim {self.tokens_mlp_dim}"
        return "a custom Mixer (" + ", ".join(f"{k} {v}" for k, v in fields.items()) + ")"


def _require(flat: Mapping[str, Any], key: str, ndim: int, source: str):
    if key not in flat:
        raise CheckpointError(f"{source} has no array {key!r}: it is not a complete MLP-Mixer "
                              f"checkpoint (found e.g. {sorted(flat)[:4]}).")
    value = flat[key]
    if len(value.shape) != ndim:
        raise CheckpointError(f"{source}: {key!r} has shape {tuple(value.shape)}; "
                              f"expected {ndim} dimensions.")
    return value


def _describe(flat: Mapping[str, Any], source: str) -> Architecture:
    stem = _require(flat, "stem/kernel", 4, source)
    blocks = sorted({int(m.group(1)) for m in map(_BLOCK.match, flat) if m})
    if not blocks:
        raise CheckpointError(f"{source} has no {models.BLOCK_PREFIX}* arrays; it is not a "
                              "complete MLP-Mixer checkpoint.")
    missing = sorted(set(range(blocks[-1] + 1)) - set(blocks))
    if missing:
        raise CheckpointError(
            f"{source} lacks {', '.join(f'{models.BLOCK_PREFIX}{i}' for i in missing)} but has "
            f"{models.BLOCK_PREFIX}{blocks[-1]}: the file is incomplete or was edited."
        )
    token = _require(flat, f"{models.BLOCK_PREFIX}0/token_mixing/Dense_0/kernel", 2, source)
    channel = _require(flat, f"{models.BLOCK_PREFIX}0/channel_mixing/Dense_0/kernel", 2, source)
    head = flat.get(_HEAD + "kernel")
    return Architecture(
        patch_size=stem.shape[0], num_blocks=len(blocks), hidden_dim=stem.shape[-1],
        tokens_mlp_dim=token.shape[1], channels_mlp_dim=channel.shape[1],
        num_tokens=token.shape[0], num_classes=None if head is None else head.shape[-1],
    )


def architecture(source: PathLike | Params) -> Architecture:
    """The architecture of an `.npz` file or a parameter tree (either layout)."""
    flat, name = _flat_source(source)
    return _describe(flat, name)


# ---------------------------------------------------------------------------- file I/O


def _is_remote(path: str) -> bool:
    """`gs://...` and other `scheme://` paths: only TensorFlow's file systems reach them."""
    return "://" in path


def _gfile():
    # Imported on use, for `scheme://` paths only: local files need no TensorFlow.
    import tensorflow as tf

    return tf


def _read_bytes(path: str) -> bytes:
    if not _is_remote(path):
        if os.path.isdir(path):
            raise CheckpointError(_IS_A_DIRECTORY.format(path=path))
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise CheckpointError(f"No checkpoint file at {path!r}.") from None
        except OSError as e:
            raise CheckpointError(f"Cannot read {path!r}: {e.strerror or e}.") from e
    tf = _gfile()
    try:
        if tf.io.gfile.isdir(path):
            raise CheckpointError(_IS_A_DIRECTORY.format(path=path))
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except tf.errors.NotFoundError:
        raise CheckpointError(f"No checkpoint file at {path!r}.") from None
    except tf.errors.OpError as e:
        raise CheckpointError(f"Cannot read {path!r}: {e.message}") from e


# The largest array of any published Mixer is Mixer-H/14's 21k-class head (112 MiB); no
# member may claim more than this before it is inflated (a deflated zip member can expand
# 1000-fold: a 14 MB file can hold a 14 GB "array").
MAX_ARRAY_BYTES = 2**31
_MAX_CLASSES = 2**17  # a head wider than this is not a classifier anyone trained
_BFLOAT16 = np.dtype(jax.numpy.bfloat16)


def _member_header(npz, key: str, path: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) that member `key` declares, checked against its size; nothing inflated."""
    name = key + ".npy"
    try:
        info = npz.zip.getinfo(name)
        with npz.zip.open(name) as member:
            version = np.lib.format.read_magic(member)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(member) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(member))
            header_size = member.tell()
    except KeyError:
        raise CheckpointError(f"{path!r}: member {key!r} is not an .npy array.") from None
    except ValueError as e:
        raise CheckpointError(f"{path!r}: the header of array {key!r} is corrupt ({e}).") from e
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path!r}: array {key!r} is truncated or corrupt ({e}); "
                              "copy or save the file again.") from e
    if dtype.hasobject:
        raise CheckpointError(
            f"{path!r}: array {key!r} is an object array. Object arrays are never loaded "
            "(unpickling can execute code); parameter files hold plain float arrays.")
    if not (np.issubdtype(dtype, np.floating) or dtype == np.dtype("V2")):
        raise CheckpointError(f"{path!r}: array {key!r} has dtype {dtype}; "
                              "parameters must be floating point.")
    declared = dtype.itemsize * math.prod(shape)
    if declared > MAX_ARRAY_BYTES:
        raise CheckpointError(
            f"{path!r}: array {key!r} claims shape {shape} ({declared / 2**30:.1f} GiB), more "
            f"than any Mixer parameter (at most {MAX_ARRAY_BYTES / 2**30:.0f} GiB): the file is "
            "corrupt or crafted; it was not read.")
    if declared != info.file_size - header_size:
        raise CheckpointError(
            f"{path!r}: array {key!r} claims shape {shape} of {dtype} ({declared} bytes) but its "
            f"zip member holds {info.file_size - header_size} bytes: the file is corrupt or "
            "crafted; it was not read.")
    return shape, dtype


_IS_A_DIRECTORY = ("{path!r} is a directory, not an .npz file (an orbax checkpoint directory "
                   "is restored with the training checkpoint tools, not this loader).")


def _write_atomically(data: bytes, path: str) -> None:
    """Writes `data` to a temporary name next to `path`, then renames it to `path`."""
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    if not _is_remote(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise
        return
    tf = _gfile()
    tf.io.gfile.makedirs(path.rsplit(SEP, 1)[0])
    try:
        with tf.io.gfile.GFile(temporary, "wb") as f:
            f.write(data)
        tf.io.gfile.rename(temporary, path, overwrite=True)
    except BaseException:
        if tf.io.gfile.exists(temporary):
            tf.io.gfile.remove(temporary)
        raise


def _read_array(npz, key: str, path: str) -> np.ndarray:
    """Inflates one member whose header `_member_header` has accepted."""
    try:
        array = npz[key]
    except ValueError as e:
        raise CheckpointError(f"{path!r}: array {key!r} is corrupt ({e}).") from e
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path!r}: array {key!r} is truncated or corrupt ({e}); "
                              "copy or save the file again.") from e
    if array.dtype == np.dtype("V2"):  # bfloat16 as big_vision writes it: numpy knows no name
        array = array.view(_BFLOAT16)
    finite = np.isfinite(array)
    if not finite.all():
        raise CheckpointError(
            f"{path!r}: array {key!r} (shape {array.shape}) holds {array.size - finite.sum()} "
            "NaN/Inf values; the model that wrote it had probably diverged."
        )
    return array


def _parse_npz(data: bytes, path: str) -> dict[str, np.ndarray]:
    if data.startswith(np.lib.format.MAGIC_PREFIX):
        raise CheckpointError(f"{path!r} is a single .npy array, not an .npz of named parameters.")
    if not data.startswith(b"PK"):
        raise CheckpointError(f"{path!r} is not an .npz file: it does not start with a zip "
                              f"header (first bytes {data[:8]!r}).")
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path!r} is a truncated or corrupt .npz file ({e}); copy or "
                              "save it again.") from e
    with npz:
        if not npz.files:
            raise CheckpointError(f"{path!r} holds no arrays.")
        # Every header first: a crafted member is refused before any array is inflated.
        _check_declared_shapes({key: _member_header(npz, key, path)[0] for key in npz.files},
                               path)
        return {key: _read_array(npz, key, path) for key in npz.files}


def _check_declared_shapes(shapes: dict[str, tuple[int, ...]], path: str) -> None:
    """Refuses a member larger than any array of the Mixer that the headers describe."""
    shapes = {key.replace("\\", SEP): shape for key, shape in shapes.items()}
    if _is_old_layout(shapes):
        return  # renamed and squeezed later; the per-array bound applies
    arch = _describe({k: types.SimpleNamespace(shape=v) for k, v in shapes.items()}, repr(path))
    limit = max(arch.patch_size ** 2 * 3 * arch.hidden_dim, arch.num_tokens * arch.tokens_mlp_dim,
                arch.hidden_dim * arch.channels_mlp_dim, arch.hidden_dim * _MAX_CLASSES)
    for key, shape in shapes.items():
        if math.prod(shape) > limit:
            raise CheckpointError(
                f"{path!r}: array {key!r} claims shape {shape}, larger than any array of the "
                f"{arch.name} its other arrays describe (at most {limit} values): the file is "
                "corrupt or crafted; it was not read.")


def load_npz(path: PathLike) -> dict:
    """Loads a published-format `.npz` into nested numpy parameters (per-block Linen layout).

    Accepts both published layouts; `path` may be local or any `tf.io.gfile`
    filesystem (`gs://...`). Raises `CheckpointError` for a missing, truncated or
    non-npz file, object arrays, non-float arrays, NaN/Inf values, a member whose
    header claims more than `MAX_ARRAY_BYTES` or more bytes than it holds (checked
    before inflating it), or a file that is not an MLP-Mixer checkpoint. Arrays keep
    their dtype (bfloat16 files from big_vision included); float16/float64 files are
    logged, since `load_pretrained` casts them to the model's dtype.
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    flat = _normalise_layout(_parse_npz(data, path), repr(path))
    _describe(flat, repr(path))  # fails early and clearly on a file that is not a Mixer
    cast = sorted({str(v.dtype) for v in flat.values()} & {"float16", "float64"})
    if cast:
        _log.info("%s stores %s arrays; models load them cast to their own parameter dtype "
                  "(float32 by default).", path, " and ".join(cast))
    _log.info("Loaded %d arrays (%.1f MiB) from %s", len(flat), len(data) / 2**20, path)
    return unflatten_params(flat)


def _host_array(key: str, value) -> np.ndarray:
    array = np.asarray(jax.device_get(value))
    if array.dtype.kind == "V":  # bfloat16 & co.: numpy-only readers could not use them
        array = array.astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise CheckpointError(f"Parameter {key!r} has dtype {array.dtype}; expected floats.")
    if not np.isfinite(array).all():
        raise CheckpointError(f"Parameter {key!r} holds NaN/Inf values; refusing to write a "
                              "checkpoint that cannot be loaded.")
    return array


def save_npz(params: Params, path: PathLike) -> str:
    """Writes `params` as a published-format `.npz` (flat "/" keys, per-block layout).

    Accepts the per-block or scanned layout, jax or numpy arrays (fully addressable:
    on several hosts, gather first and save from one process). Arrays keep their
    dtype, except bfloat16, which is stored as float32 (exactly) so that any numpy
    reader can use the file. The file is written to a temporary name next to
    `path` and renamed, so a crash never leaves a partial file at `path`.
    Returns `path`.
    """
    path = os.fspath(path)
    flat = {key: _host_array(key, value) for key, value in flatten_params(params).items()}
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    _write_atomically(buffer.getvalue(), path)
    _log.info("Saved %d arrays (%.1f MiB) to %s", len(flat), buffer.tell() / 2**20, path)
    return path


# ------------------------------------------------------------------------ fine-tuning


def _flat_source(source: PathLike | Params,
                 source_name: str | None = None) -> tuple[dict[str, Any], str]:
    """Flat parameters and the name messages use for them: the file's path, or
    `source_name` (e.g. where a loaded tree came from)."""
    if isinstance(source, Mapping):
        name = repr(source_name) if source_name else "The given parameters"
        return _normalise_layout(flatten_params(source), name), name
    path = os.fspath(source)
    return flatten_params(load_npz(path)), repr(path)


def _image_grid(image_size: ImageSize, patch_size: int) -> resolution.Grid:
    """The (rows, columns) patch grid of an image size (int for square images)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if height % patch_size or width % patch_size:
        raise CheckpointError(f"Image size {height}x{width} is not a multiple of the patch "
                              f"size {patch_size}.")
    return height // patch_size, width // patch_size


def _grid(image_size: ImageSize | None, patch_size: int, num_tokens: int,
          what: str) -> resolution.Grid:
    """Patch grid from an image size, or the square grid of `num_tokens`."""
    if image_size is None:
        try:
            return resolution.square_grid(num_tokens)
        except ValueError:
            raise CheckpointError(
                f"{what} has {num_tokens} tokens, not a square patch grid; pass its image "
                "size (height, width)."
            ) from None
    grid = _image_grid(image_size, patch_size)
    if grid[0] * grid[1] != num_tokens:
        raise CheckpointError(
            f"{what} has {num_tokens} tokens, but an image of size {image_size} has "
            f"{grid[0]}x{grid[1]} = {grid[0] * grid[1]} patches of {patch_size} pixels."
        )
    return grid


@dataclasses.dataclass(frozen=True)
class _TokenMixingPlan:
    method: str  # copy | block_diagonal | resample | reinit
    source_grid: resolution.Grid | None = None
    target_grid: resolution.Grid | None = None
    tokens_mlp_dim: int | None = None  # what the model needs; None: any (reinit)


def _plan_token_mixing(method: str, file: Architecture, source_image_size,
                       target_grid_of) -> _TokenMixingPlan:
    """Chooses how the token-mixing MLPs are carried over (see `load_pretrained`)."""
    if method not in TOKEN_MIXING_METHODS:
        raise ValueError(f"token_mixing must be one of {TOKEN_MIXING_METHODS}, got {method!r}.")
    if method == "reinit":
        return _TokenMixingPlan("reinit")
    source = _grid(source_image_size, file.patch_size, file.num_tokens, "The file")
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
    tiles = factors[0] * factors[1] if method == "block_diagonal" else 1
    return _TokenMixingPlan(method, source, target, file.tokens_mlp_dim * tiles)


def adapted_model_overrides(source: PathLike | Params, image_size: ImageSize, *,
                            token_mixing: str = "auto",
                            source_image_size: ImageSize | None = None) -> dict[str, int]:
    """The `MlpMixer` architecture fields for fine-tuning `source` at `image_size`.

    E.g. a Mixer-B_16 file at image_size=448 (integer factor 2, block-diagonal
    method) needs tokens_mlp_dim = 4 * 384. Use as
    `models.create_model(variant, num_classes=..., **adapted_model_overrides(path, 448))`.
    `token_mixing` and `source_image_size` as in `load_pretrained`.
    """
    flat, name = _flat_source(source)
    file = _describe(flat, name)
    grid = _image_grid(image_size, file.patch_size)
    plan = _plan_token_mixing(token_mixing, file, source_image_size, lambda _: grid)
    fields = file.model_fields()
    fields["tokens_mlp_dim"] = plan.tokens_mlp_dim or file.tokens_mlp_dim
    return fields


def _check_variant(file_flat, model_flat, file: Architecture, model: Architecture, name: str):
    """Same stem, blocks and channel MLPs, or an error saying which variant is which."""
    fields = ("patch_size", "num_blocks", "hidden_dim", "channels_mlp_dim")
    differences = [f"{f} {getattr(file, f)} vs {getattr(model, f)}"
                   for f in fields if getattr(file, f) != getattr(model, f)]
    if not differences:
        return
    fixed = lambda k: not (k.startswith(_HEAD) or _TOKEN_MIXING.match(k))
    # The stem kernel first: its shape alone tells patch size and width apart.
    keys = sorted(model_flat, key=lambda k: k != "stem/kernel")
    mismatch = next((f"{k!r} has shape {tuple(file_flat[k].shape)} in the file, the model "
                     f"expects {tuple(model_flat[k].shape)}" for k in keys
                     if fixed(k) and k in file_flat and file_flat[k].shape != model_flat[k].shape),
                    None)
    mismatch = mismatch or next(
        (f"{k!r} (shape {tuple(model_flat[k].shape)}) is missing from the file" for k in keys
         if fixed(k) and k not in file_flat), None)
    mismatch = mismatch or next(
        (f"{k!r} is in the file but not in the model" for k in file_flat
         if fixed(k) and k not in model_flat), "the shapes differ")
    raise CheckpointError(
        f"{name} does not fit the model: {mismatch}. This file is {file.name}, the model is "
        f"{model.name} (file vs model: {', '.join(differences)}). Build the model with the "
        "file's architecture or load a checkpoint of the model's variant."
    )


def _head_from_file(file_flat, model_flat, reset_head: bool | None, name: str) -> bool:
    kernel = _HEAD + "kernel"
    if kernel not in model_flat or kernel not in file_flat or reset_head:
        return False
    if file_flat[kernel].shape == model_flat[kernel].shape:
        return True
    if reset_head is None:
        _log.info("Replacing the head: %d classes in %s, %d in the model.",
                  file_flat[kernel].shape[-1], name, model_flat[kernel].shape[-1])
        return False
    raise CheckpointError(
        f"{kernel!r}: the model expects shape {tuple(model_flat[kernel].shape)}, {name} has "
        f"{tuple(file_flat[kernel].shape)}: the file has a {file_flat[kernel].shape[-1]}-class "
        f"head, the model {model_flat[kernel].shape[-1]} classes. Pass reset_head=None or True "
        "to start from the model's own head."
    )


def _check_token_mixing_width(plan: _TokenMixingPlan, file: Architecture, model: Architecture,
                              model_flat, file_flat, name: str):
    if plan.tokens_mlp_dim in (None, model.tokens_mlp_dim):
        return
    key = f"{models.BLOCK_PREFIX}0/token_mixing/Dense_0/kernel"
    (h, w), (big_h, big_w) = plan.source_grid, plan.target_grid
    if plan.method == "copy":
        cause = (f"the token MLP widths differ: this file is {file.name}, the model is "
                 f"{model.name}. Build the model with tokens_mlp_dim={plan.tokens_mlp_dim}.")
    else:
        cause = (
            f"the file was trained on a {h}x{w} patch grid and the model uses {big_h}x{big_w}; "
            f"the {plan.method} method needs tokens_mlp_dim={plan.tokens_mlp_dim} (the model "
            f"has {model.tokens_mlp_dim}). Build the model with create_model(..., "
            "**checkpoint.adapted_model_overrides(path, image_size, "
            f"token_mixing={plan.method!r}))"
            + (" or pass token_mixing='resample' to keep tokens_mlp_dim."
               if plan.method == "block_diagonal" else ".")
        )
    raise CheckpointError(
        f"{key!r}: the model expects shape {tuple(model_flat[key].shape)}, {name} has "
        f"{tuple(file_flat[key].shape)}: {cause}"
    )


def _check_keys(file_flat, model_flat, take_from_file, name: str):
    """Every key the model takes from the file exists there with the model's shape."""
    for key, value in model_flat.items():
        if not take_from_file(key):
            continue
        if key not in file_flat:
            raise CheckpointError(f"{name} has no {key!r} (the model expects shape "
                                  f"{tuple(value.shape)}): the file is incomplete or comes "
                                  "from a different model definition.")
        if not _TOKEN_MIXING.match(key) and file_flat[key].shape != value.shape:
            raise CheckpointError(f"{key!r}: the model expects shape {tuple(value.shape)}, "
                                  f"{name} has {tuple(file_flat[key].shape)}: the file comes "
                                  "from a different model definition.")
    for key in file_flat:
        if key not in model_flat and not key.startswith(_HEAD):
            raise CheckpointError(
                f"{name} has {key!r} (shape {tuple(file_flat[key].shape)}), which the model "
                "does not have: the file comes from a different model definition."
            )


def _adapt_token_mixing(file_flat, plan: _TokenMixingPlan, file: Architecture,
                        name: str) -> dict[str, Any]:
    adapt = {"block_diagonal": resolution.block_diagonal, "resample": resolution.resample}
    tokens, width = file.num_tokens, file.tokens_mlp_dim
    shapes = {"Dense_0/kernel": (tokens, width), "Dense_0/bias": (width,),
              "Dense_1/kernel": (width, tokens), "Dense_1/bias": (tokens,)}
    out = {}
    for i in range(file.num_blocks):
        prefix = f"{models.BLOCK_PREFIX}{i}/token_mixing/"
        for key, shape in shapes.items():
            if file_flat[prefix + key].shape != shape:
                raise CheckpointError(
                    f"{name}: {prefix + key!r} has shape {tuple(file_flat[prefix + key].shape)}, "
                    f"inconsistent with {models.BLOCK_PREFIX}0's token MLP ({tokens} tokens, "
                    f"width {width}, so {shape}): the file is corrupt or was edited."
                )
        mlp = unflatten_params({k[len(prefix):]: np.asarray(v) for k, v in file_flat.items()
                                if k.startswith(prefix)})
        if plan.method in adapt:
            mlp = adapt[plan.method](mlp, plan.source_grid, plan.target_grid)
        out.update({prefix + k: v for k, v in traverse_util.flatten_dict(mlp, sep=SEP).items()})
    return out


def load_pretrained(source: PathLike | Params, init_params: Params, *,
                    reset_head: bool | None = None, token_mixing: str = "auto",
                    image_size: ImageSize | None = None,
                    source_image_size: ImageSize | None = None,
                    source_name: str | None = None) -> dict:
    """Parameters for a new model, from a pre-trained `.npz` (or an already loaded tree).

    Args:
      source: path of a published-format `.npz` (either layout, local or gs://),
        or a nested parameter dict.
      init_params: the new model's freshly initialised parameters, per-block or
        scanned layout. The result has exactly their structure, shapes and dtypes
        (numpy arrays on the host; place them on devices yourself).
      reset_head: None (default): keep the file's head if its class count matches
        the model's, else take the model's head from `init_params`. True: always
        take the model's head. False: require the file's head to fit. A model
        without a head (`num_classes=None`) ignores the file's head.
      token_mixing: how the token-mixing MLPs are carried over when the patch grid
        differs (see `mixer_jax.resolution` for both schemes):
        "auto" (default): unchanged grid -> copied; grid larger by integer factors
          (e.g. 224 -> 448) -> "block_diagonal"; any other grid -> "resample".
        "block_diagonal": the paper's method; the model must be built with
          tokens_mlp_dim = kh*kw * the file's (see `adapted_model_overrides`).
        "resample": resize the kernels over the patch grid; tokens_mlp_dim unchanged.
        "reinit": keep `init_params`' token-mixing MLPs (everything else loaded).
      image_size: the new model's image size (int or (height, width)); only needed
        when its patch grid is not square. Default: square grid from init_params.
      source_image_size: the pre-training image size, if not square.
      source_name: where an already loaded `source` tree came from (its path), for the
        log and error messages.

    Raises:
      CheckpointError naming the key, expected and found shapes and the likely
      cause (e.g. "this file is Mixer-L_16, the model is Mixer-B_16") for any
      mismatch other than those adapted above.
    """
    if set(init_params) == {"params"}:  # a Flax variables dict: answer in kind
        return {"params": load_pretrained(
            source, init_params["params"], reset_head=reset_head, token_mixing=token_mixing,
            image_size=image_size, source_image_size=source_image_size,
            source_name=source_name)}
    file_flat, name = _flat_source(source, source_name)
    model_flat = flatten_params(init_params)
    file, model = _describe(file_flat, name), _describe(model_flat, "The model")
    _check_variant(file_flat, model_flat, file, model, name)

    target_grid_of = lambda src: (src if model.num_tokens == file.num_tokens and image_size is None
                                  else _grid(image_size, model.patch_size, model.num_tokens,
                                             "The model"))
    plan = _plan_token_mixing(token_mixing, file, source_image_size, target_grid_of)
    _check_token_mixing_width(plan, file, model, model_flat, file_flat, name)
    head_from_file = _head_from_file(file_flat, model_flat, reset_head, name)

    def take_from_file(key: str) -> bool:
        if key.startswith(_HEAD):
            return head_from_file
        return plan.method != "reinit" or not _TOKEN_MIXING.match(key)

    _check_keys(file_flat, model_flat, take_from_file, name)
    adapted = {} if plan.method == "reinit" else _adapt_token_mixing(file_flat, plan, file, name)
    _log.info("Loaded %s into a %s model (head %s, token mixing: %s).", name, model.name,
              "from the file" if head_from_file else "from init_params", plan.method)

    out = {}
    for key, init in model_flat.items():
        value = adapted.get(key, file_flat.get(key)) if take_from_file(key) else init
        out[key] = np.asarray(jax.device_get(value)).astype(init.dtype, copy=False)
    params = unflatten_params(out)
    if models.SCANNED_BLOCKS in init_params:
        params = jax.device_get(models.stack_blocks(params))
    return params


# timm's formats live in `mixer_jax.timm_weights` (which uses this module); re-exported
# lazily here so that `checkpoint.load_timm` works without an import cycle.
_TIMM_API = ("load_timm", "read_timm", "save_timm", "to_timm", "is_timm_source",
             "TimmWeights")


def __getattr__(name: str):
    if name in _TIMM_API:
        from mixer_jax import timm_weights

        return getattr(timm_weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
