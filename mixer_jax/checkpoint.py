"""Published-format `.npz` checkpoints: reading and writing (fine-tuning: `mixer_jax.finetune`).

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
- `architecture(source)`: what a Mixer file (or parameter tree) is, e.g. "Mixer-B_16".
- `load_pretrained`, `adapted_model_overrides`: re-exported from `mixer_jax.finetune`.
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

from mixer_jax import models
from mixer_jax.errors import UserError

PathLike = str | os.PathLike
Params = Mapping[str, Any]
ImageSize = int | tuple[int, int]

SEP = "/"
_HEAD = "head" + SEP
_BLOCK = re.compile(rf"^{models.BLOCK_PREFIX}(\d+)/")

_log = logging.getLogger(__name__)


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read, or that does not fit the model."""


# ----------------------------------------------------------------------------- layout


def flatten_params(params: Params) -> dict[str, Any]:
    """Nested parameters of any family (per-block or scanned layout) -> flat
    `{"stem/kernel": array, ...}`.

    The flat keys are those files hold (per-block layout: scanned blocks unstacked,
    `models.registry.per_block`). A Flax variables dict `{"params": ...}` is accepted too.
    """
    if set(params) == {"params"}:
        params = params["params"]
    params = nn.meta.unbox(dict(params))  # `model.init` boxes parameters with their axis names
    return traverse_util.flatten_dict(models.registry.per_block(params), sep=SEP)


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
# Fine-tuning adaptation lives in `mixer_jax.finetune` (any registered family); these
# names stay importable from here.


def _flat_source(source: PathLike | Params,
                 source_name: str | None = None) -> tuple[dict[str, Any], str]:
    """Flat parameters and the name messages use for them: the file's path, or
    `source_name` (e.g. where a loaded tree came from)."""
    if isinstance(source, Mapping):
        name = repr(source_name) if source_name else "The given parameters"
        return _normalise_layout(flatten_params(source), name), name
    path = os.fspath(source)
    return flatten_params(load_npz(path)), repr(path)


from mixer_jax.finetune import (TOKEN_MIXING_METHODS, adapted_model_overrides,  # noqa: E402
                                load_pretrained)


# timm's formats live in `mixer_jax.timm_weights` (which uses this module); re-exported
# lazily here so that `checkpoint.load_timm` works without an import cycle.
_TIMM_API = ("load_timm", "read_timm", "save_timm", "to_timm", "is_timm_source",
             "TimmWeights")


def __getattr__(name: str):
    if name in _TIMM_API:
        from mixer_jax import timm_weights

        return getattr(timm_weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
