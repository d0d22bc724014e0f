"""Weights in timm's format: read any timm source, write `.safetensors` that timm loads.

Sources `read_timm` / `load_timm` accept:
- a `.safetensors` file (read with safetensors' numpy API: no PyTorch needed);
- a `.pth` / `.bin` file, only when torch is installed, through
  `torch.load(weights_only=True)`: a pickle that would run code is refused unread;
- a state dict (a mapping of numpy arrays or torch tensors);
- a local Hugging Face Hub snapshot folder of `timm/<name>.<tag>` (`config.json`
  gives the model name, class count and preprocessing; `model.safetensors` or
  `pytorch_model.bin` the weights);
- `hf-hub:timm/<name>.<tag>`: the Hub's cache first; otherwise downloaded through
  `huggingface_hub` (optional) after a quick reachability check, so an offline
  machine fails in seconds instead of entering huggingface_hub's retry loop.

Without a name, the family and variant are recognised from the keys and shapes
(each registered family's `from_timm` and `architecture`), or from `config.json`.
Every problem raises one `checkpoint.CheckpointError` naming the key, the expected
and found shapes and the likely cause ("this file is gmixer_24_224, the model is
gmixer_12_224"). Arrays keep the file's dtype, so `load_timm(save_timm(p))` is `p`
bit for bit. The key names and layouts are each family's (`Family.from_timm` /
`Family.to_timm`); this module knows only the file formats.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import socket
import urllib.parse
import uuid
import zipfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mixer_jax import checkpoint, models
from mixer_jax.models import registry

HF_HUB_PREFIX = "hf-hub:"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_META_MODEL, _META_PREPROCESSING = "mixer_jax.model", "mixer_jax.preprocessing"
_REACH_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class TimmWeights:
    """What a timm source holds, ready for `models.create_model(name, **model_overrides)`."""

    name: str                  # the registered model name
    params: dict               # nested numpy parameters (per-block layout, the file's dtypes)
    num_classes: int | None    # the head's class count (None: the file has no head)
    preprocessing: registry.Preprocessing  # what the weights expect (config.json or default)
    source: str                # a description of the source, for messages
    # The model's constants (`registry.split_variables`): {} for timm's models; the
    # official RandFormer files' frozen matrices (`official_weights.read_official`).
    constants: dict = dataclasses.field(default_factory=dict)

    @property
    def model_overrides(self) -> dict:
        return {"num_classes": self.num_classes}

    @property
    def variables(self) -> dict:
        """What `model.apply` takes: `{"params": ..., **constants}`."""
        return registry.as_variables(self.params, self.constants)


def _error(message: str) -> checkpoint.CheckpointError:
    return checkpoint.CheckpointError(message)


# ------------------------------------------------------------------------- reading


def _numpy(key: str, value, label: str) -> np.ndarray:
    """A numpy array of `value` (numpy, jax or torch), its dtype kept (bfloat16 too)."""
    if hasattr(value, "detach"):  # a torch tensor: torch is imported by whoever made it
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16; reinterpret the bits
            import torch

            return value.view(torch.int16).numpy().view(jnp.bfloat16)
        return value.numpy()
    array = np.asarray(jax.device_get(value))
    if array.dtype == object:
        raise _error(f"{label}: {key!r} is not an array (a {type(value).__name__}).")
    return array


def _checked(state_dict: Mapping[str, Any], label: str) -> dict[str, np.ndarray]:
    """Numpy arrays, every floating one finite; integer buffers pass for the family to judge."""
    if not state_dict:
        raise _error(f"{label} holds no arrays.")
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise _error(f"{label}: key {key!r} is not a string; a state dict maps names to arrays.")
        array = _numpy(key, value, label)
        if jnp.issubdtype(array.dtype, jnp.floating):
            finite = np.isfinite(array)
            if not finite.all():
                raise _error(f"{label}: {key!r} (shape {array.shape}) holds "
                             f"{array.size - finite.sum()} NaN/Inf values; the model that wrote "
                             "it had probably diverged.")
        elif not jnp.issubdtype(array.dtype, jnp.integer):
            raise _error(f"{label}: {key!r} has dtype {array.dtype}; weights are numbers.")
        out[key] = array
    return out


def _read_safetensors(path: str, keys_only: bool = False) -> tuple[dict, dict]:
    """(arrays, metadata); `keys_only`: {key: None} from the header, no array read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as f:
            return ({k: None if keys_only else f.get_tensor(k) for k in f.keys()},
                    dict(f.metadata() or {}))
    except (SafetensorError, OSError, ValueError) as e:
        raise _error(f"{path!r} is not a readable .safetensors file ({e}): it is truncated, "
                     "corrupt or of another format; download or save it again.") from None


def _read_torch(path: str, mmap: bool = False) -> dict:
    """The state dict of a PyTorch file (`mmap`: arrays mapped, not read, until used)."""
    try:
        import torch
    except ImportError:
        raise _error(f"{path!r} is a PyTorch file; reading it needs torch (pip install torch). "
                     "Or load the .safetensors version of the weights, which needs no torch."
                     ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _error(f"{path!r} holds Python objects besides tensors ({first_line}); it was not "
                     "loaded, because unpickling them could run code. Load a plain state dict "
                     "or a .safetensors file.") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise _error(f"{path!r} is a truncated or corrupt PyTorch file ({e}); download or save "
                     "it again.") from None
    # Training checkpoints wrap the weights; timm's own release files are plain state dicts.
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping):
        raise _error(f"{path!r} holds a {type(loaded).__name__}, not a state dict.")
    return dict(loaded)


def _hints_from_config(config: Mapping, path: str) -> dict:
    """Model name, class count, image size and preprocessing from timm's config.json."""
    cfg = config.get("pretrained_cfg", {})
    hints = {"name": config.get("architecture")}
    if cfg.get("input_size"):
        hints["image_size"] = tuple(cfg["input_size"][-2:])
    try:
        hints["preprocessing"] = registry.Preprocessing(
            mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), input_size=int(cfg["input_size"][-1]),
            crop_pct=float(cfg.get("crop_pct", 0.875)),
            interpolation=cfg.get("interpolation", "bicubic"))
    except (KeyError, TypeError, ValueError, IndexError):
        pass  # no or partial pretrained_cfg: the family's default preprocessing
    return hints


def _read_folder(folder: str) -> tuple[dict, dict, str]:
    config_path = os.path.join(folder, "config.json")
    hints = {}
    if os.path.exists(config_path):
        try:
            with open(config_path) as f:
                hints = _hints_from_config(json.load(f), config_path)
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise _error(f"{config_path!r} is not a readable timm config ({e}).") from None
    weights = next((os.path.join(folder, n) for n in _WEIGHT_FILES
                    if os.path.exists(os.path.join(folder, n))), None)
    if weights is None:
        raise _error(f"{folder!r} has none of {', '.join(_WEIGHT_FILES)}: it is not a timm "
                     "snapshot folder (download it completely, e.g. `hf download timm/<name>`).")
    state_dict, file_hints = _read_file(weights)
    return state_dict, {**file_hints, **{k: v for k, v in hints.items() if v is not None}}, \
        repr(weights)


def file_keys(path: str) -> list[str]:
    """The keys of a `.safetensors`/`.pth` file, its arrays left unread (safetensors: the
    header; PyTorch: memory-mapped). Raises CheckpointError for a file it cannot read."""
    if path.endswith(_TORCH_SUFFIXES):
        return list(_read_torch(path, mmap=True))
    return list(_read_safetensors(path, keys_only=True)[0])


def _read_file(path: str) -> tuple[dict, dict]:
    if path.endswith(_TORCH_SUFFIXES):
        return _read_torch(path), {}
    state_dict, metadata = _read_safetensors(path)
    hints = {}
    if _META_MODEL in metadata:  # written by save_timm
        hints["name"] = metadata[_META_MODEL]
    if _META_PREPROCESSING in metadata:
        fields = json.loads(metadata[_META_PREPROCESSING])
        hints["preprocessing"] = registry.Preprocessing(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        hints["image_size"] = (hints["preprocessing"].input_size,) * 2
    return state_dict, hints


def is_timm_source(source) -> bool:
    """Whether `source` is for `read_timm` (vs. an `.npz` or orbax checkpoint), from its form:
    an hf-hub: id, a .safetensors/.pth/.bin file, a folder holding timm's weight file, or a
    state dict with dotted keys."""
    if isinstance(source, Mapping):  # flat, dotted keys (a nested dict is a parameter tree)
        return (any("." in k for k in source) and not any("/" in k for k in source)
                and not any(isinstance(v, Mapping) for v in source.values()))
    path = os.fspath(source)
    return (path.startswith(HF_HUB_PREFIX) or path.endswith((".safetensors", *_TORCH_SUFFIXES))
            or any(os.path.exists(os.path.join(path, n)) for n in _WEIGHT_FILES))


def read_state_dict(source) -> tuple[dict[str, np.ndarray], str]:
    """(numpy state dict, a label for messages) of a `.safetensors`/`.pth` file, a snapshot
    folder or a state dict, its floating arrays checked finite; no key is interpreted."""
    state_dict, _, label = _read_source(source)
    return state_dict, label


def _read_source(source) -> tuple[dict, dict, str]:
    """(state dict of numpy arrays, hints {name, image_size, preprocessing}, label)."""
    if isinstance(source, Mapping):
        label = "The given state dict"
        return _checked(source, label), {}, label
    path = os.fspath(source)
    if path.startswith(HF_HUB_PREFIX):
        state_dict, hints, label = _read_folder(hub_snapshot(path[len(HF_HUB_PREFIX):]))
    elif os.path.isdir(path):
        state_dict, hints, label = _read_folder(path)
    elif not os.path.exists(path):
        raise _error(f"No timm weights at {path!r} (a .safetensors/.pth file, a snapshot folder "
                     f"or '{HF_HUB_PREFIX}timm/<name>.<tag>').")
    else:
        (state_dict, hints), label = _read_file(path), repr(path)
    return _checked(state_dict, label), hints, label


# ------------------------------------------------------------------ Hugging Face Hub


def hub_snapshot(repo_id: str) -> str:
    """The local folder of `repo_id`'s config.json and weights: cached, else downloaded."""
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:
        raise _error(f"'{HF_HUB_PREFIX}{repo_id}' needs huggingface_hub (pip install "
                     "'mixer_jax[hub]'); or pass a downloaded snapshot folder.") from None

    def fetch(filename: str, local: bool) -> str:
        return huggingface_hub.hf_hub_download(repo_id, filename, local_files_only=local,
                                               endpoint=constants.ENDPOINT, etag_timeout=10)

    def fetch_all(local: bool) -> str:
        for weights in _WEIGHT_FILES:
            try:
                folder = os.path.dirname(fetch(weights, local))
                break
            except errors.EntryNotFoundError as e:
                if isinstance(e, errors.LocalEntryNotFoundError) and local:
                    raise
                last = e
        else:
            raise last
        try:
            fetch("config.json", local)
        except errors.EntryNotFoundError:
            pass  # weights without a config: the family's defaults apply
        return folder

    try:
        return fetch_all(local=True)
    except errors.LocalEntryNotFoundError:
        pass
    offline = getattr(constants, "is_offline_mode", lambda: constants.HF_HUB_OFFLINE)
    if offline():
        raise _error(f"'{HF_HUB_PREFIX}{repo_id}' is not in the Hugging Face cache and "
                     "HF_HUB_OFFLINE is set; download it on a connected machine or pass a "
                     "local snapshot folder or .safetensors file.")
    _require_reachable(constants.ENDPOINT, repo_id)
    try:
        return fetch_all(local=False)
    except (errors.HfHubHTTPError, errors.EntryNotFoundError, OSError) as e:
        raise _error(f"Cannot download '{HF_HUB_PREFIX}{repo_id}': {str(e).splitlines()[0]}. "
                     "Check the name (timm/<model>.<tag>) and your connection.") from None


def _require_reachable(endpoint: str, repo_id: str) -> None:
    """One short connection attempt: huggingface_hub itself would retry for a minute."""
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=_REACH_TIMEOUT_S).close()
    except OSError as e:
        raise _error(f"Cannot reach {endpoint} to download '{HF_HUB_PREFIX}{repo_id}' ({e}): "
                     "this machine looks offline. Download the snapshot where there is a "
                     f"network (`hf download {repo_id}`) and pass its folder, or a "
                     ".safetensors file.") from None


# -------------------------------------------------------------------- model matching


def _zeros(shape, dtype=np.float32) -> np.ndarray:
    """A read-only array of `shape` that takes no memory (for layout conversions of shapes)."""
    return np.broadcast_to(np.zeros((), dtype), shape)


def variant_of(family: registry.Family, flat) -> str | None:
    """The name of `family`'s variant that flat parameters are (timm's names first)."""
    try:
        fields = family.architecture(flat)
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    timm = set(family.timm_names.values())  # e.g. mixer_b16_224 before Mixer-B_16
    for name in sorted(family.variants, key=lambda n: n not in timm):
        if all(family.variants[name].get(k, v) == v for k, v in fields.items()):
            return name
    return None


def model_name(params) -> str | None:
    """The registered variant a parameter tree (nested or flat) is, from its shapes, or None."""
    flat = params if all("/" in k for k in params) else checkpoint.flatten_params(params)
    return next(filter(None, (variant_of(models.get_family(f), flat)
                              for f in models.list_families())), None)


def _identify(state_dict) -> tuple[str, dict] | None:
    """(model name, flat params) of the registered variant whose layout `state_dict` has."""
    for family in map(models.get_family, models.list_families()):
        try:
            flat = family.from_timm(state_dict) if family.from_timm else None
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        name = flat is not None and variant_of(family, flat)
        if name:
            return name, flat
    return None


def _first_mismatch(found: Mapping[str, tuple], expected: Mapping[str, tuple]) -> str | None:
    """The first missing key, extra key or shape difference, in words."""
    for key, shape in expected.items():
        if key not in found:
            return f"{key!r} (shape {shape}) is missing"
        if tuple(found[key]) != tuple(shape):
            return f"{key!r} has shape {tuple(found[key])}, the model expects {tuple(shape)}"
    extra = next((k for k in found if k not in expected), None)
    return extra and f"{extra!r} (shape {tuple(found[extra])}) is not in the model"


@dataclasses.dataclass(frozen=True)
class _Expected:
    """The model a name and a file's head make, and what its parameters must look like."""

    family: registry.Family
    name: str
    image_size: tuple[int, int]
    identified: str | None  # what the file is, where it is a registered variant
    label: str
    subject: str = "this file is"  # what `identified` describes, in messages
    num_classes: int | None = 1000

    @functools.cached_property
    def model(self):
        return models.create_model(self.name, num_classes=self.num_classes)

    @functools.cached_property
    def shapes(self) -> dict[str, tuple]:
        return {k: shape for k, (shape, _) in _abstract(self.model, self.image_size).items()}

    @functools.cached_property
    def timm_shapes(self) -> dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in self.family.to_timm(
            {k: _zeros(s) for k, s in self.shapes.items()}).items()}

    def check(self, found: Mapping[str, tuple], timm_space: bool = False) -> None:
        """Raises CheckpointError unless `found` shapes are exactly the expected ones."""
        mismatch = _first_mismatch(found, self.timm_shapes if timm_space else self.shapes)
        if mismatch is None:
            return
        if self.identified and self.identified != self.name:
            cause = f"{self.subject} {self.identified}, the model is {self.name}"
        else:
            cause = f"{self.subject} incomplete, or not a {self.name} of timm's definition"
        size = f"{self.image_size[0]}x{self.image_size[1]}"
        raise _error(f"{self.name} ({size}) cannot use {self.label}: {mismatch}; {cause}.")


@functools.lru_cache(maxsize=16)
def _abstract(model, image_size: tuple[int, int]) -> dict[str, tuple[tuple, tuple]]:
    """{flat key: (shape, logical axis names)} of `model`'s parameters (nothing computed)."""
    boxed = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, *image_size, 3), jnp.float32))["params"])
    out = {}
    for key, leaf in traverse_util.flatten_dict(boxed, sep="/").items():
        shape = tuple(nn.meta.unbox(leaf).shape)
        out[key] = shape, tuple(getattr(leaf, "names", (None,) * len(shape)))
    return out


def _num_classes(name: str, flat, image_size) -> int | None:
    """The class count of the classifier in `flat` (None: no classifier), by the "classes" axis."""
    for key, (_, names) in _abstract(models.create_model(name), image_size).items():
        if "classes" in names and key in flat:
            return flat[key].shape[names.index("classes")]
    return None


def _image_size(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def read_timm(source, name: str | None = None) -> TimmWeights:
    """Reads timm weights (see the module docstring for `source`) for `create_model(name)`.

    `name`: a registered model name; None: recognised from the keys and shapes (or
    the snapshot's config.json). Returns the name, the parameters (per-block layout,
    the file's dtypes), the class count and the preprocessing the weights expect.
    """
    state_dict, hints, label = _read_source(source)
    found = _identify(state_dict)
    name = name or hints.get("name") or (found and found[0])
    if not name:
        raise _error(f"{label} is not a timm checkpoint of any model mixer_jax knows (keys e.g. "
                     f"{sorted(state_dict)[:3]}); `mixer_jax.models.list_models()` lists them. "
                     "If it is one with missing or extra keys, pass its name to see which.")
    try:
        family = models.get_family(name)
    except ValueError as e:
        raise _error(f"{label}: {e}") from None
    name = registry.canonical_name(name)
    if family.from_timm is None:
        raise _error(f"{name}'s family ({family.name}) has no timm key map.")
    image_size = _image_size(hints.get("image_size") or family.preprocessing.input_size)
    flat = found[1] if found and models.get_family(found[0]) is family else None
    if flat is None:
        # Missing or extra keys: convert what is there (gaps filled), for the class count;
        # the check below then names the first difference.
        default = _Expected(family, name, image_size, None, label).timm_shapes
        try:
            flat = family.from_timm({k: state_dict.get(k, _zeros(s)) for k, s in default.items()})
        except (ValueError, KeyError, IndexError):
            pass
    expected = _Expected(family, name, image_size, found and found[0], label, "this file is",
                         _num_classes(name, flat, image_size) if flat is not None else 1000)
    expected.check({k: v.shape for k, v in state_dict.items()}, timm_space=True)
    expected.check({k: v.shape for k, v in flat.items()})
    preprocessing = hints.get("preprocessing") or dataclasses.replace(
        family.preprocessing, input_size=image_size[0])
    return TimmWeights(name, checkpoint.unflatten_params(flat), expected.num_classes,
                       preprocessing, label)


def load_timm(source, name: str | None = None) -> dict:
    """The parameters of timm weights for `create_model(name)` (see `read_timm`)."""
    return read_timm(source, name).params


# -------------------------------------------------------------------------- writing


def to_timm(params, name: str, *, image_size: int | tuple[int, int] | None = None) -> dict:
    """`params` of `create_model(name)` -> timm's state dict (numpy arrays, dtypes kept).

    `image_size`: the size the parameters were made for (default: the family's, 224),
    which fixes the token count of token-mixing weights.
    """
    family = models.get_family(name)
    name = registry.canonical_name(name)
    if family.to_timm is None:
        raise _error(f"{name}'s family ({family.name}) has no timm key map.")
    flat = _checked(checkpoint.flatten_params(params), "The parameters")
    size = _image_size(image_size or family.preprocessing.input_size)
    _Expected(family, name, size, model_name(flat), "the parameters",
              "the parameters are", _num_classes(name, flat, size)
              ).check({k: v.shape for k, v in flat.items()})
    return {k: np.ascontiguousarray(v) for k, v in family.to_timm(flat).items()}


def save_timm(params, name: str, path, *, image_size: int | tuple[int, int] | None = None,
              preprocessing: registry.Preprocessing | None = None) -> str:
    """Writes `params` as a `.safetensors` file that `timm.create_model(timm name)` loads strictly.

    The file also records the model name and the preprocessing (default: the family's)
    as safetensors metadata, which `read_timm` reads back. Written atomically.
    """
    from safetensors.numpy import save_file

    state_dict = to_timm(params, name, image_size=image_size)
    family = models.get_family(name)
    preprocessing = preprocessing or dataclasses.replace(
        family.preprocessing,
        input_size=_image_size(image_size or family.preprocessing.input_size)[0])
    metadata = {"format": "pt", _META_MODEL: registry.canonical_name(name),
                _META_PREPROCESSING: json.dumps(dataclasses.asdict(preprocessing))}
    path = os.fspath(path)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        save_file(state_dict, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
