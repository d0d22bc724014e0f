"""One registry for every model family: names, construction, and what a family knows.

A family (one file under `mixer_jax/models/`) describes itself with a `Family` and
calls `register(family)` at import time; `mixer_jax.models` imports every family
file, so `list_models()` / `create_model(name)` see them all. The rest of the
library asks the registry, never a family's key names:

- construction: `create_model(name, num_classes=..., **overrides)`;
- the architecture of a parameter tree: `Family.architecture(flat)`;
- timm's state dict: `Family.from_timm` / `Family.to_timm` (key names and layouts);
- the classifier (reset on a new class count): `Family.classifier`;
- the per-block and scanned layouts of isotropic families (`Family.block_layout`):
  `per_block(params)` / `stacked_like(params, like)` convert any family's tree;
- how each parameter is sharded, and which of its axes are token axes: logical
  axis names declared on the parameters themselves (`AXES` below).

Conventions every family's module follows (one model API):
- `__call__(images, *, train=False, return_intermediates=False)`; images NHWC,
  normalised as the family's `Preprocessing` says; logits, or pooled features
  when `num_classes` is None; with `return_intermediates=True`,
  `(output, {name: array})` from the same forward pass ('stem', 'block_{i}' or
  'stage_{i}' (NHWC feature maps), 'pre_logits').
- fields `num_classes`, `dropout`, `stoch_depth` (each family's documented rule),
  `dtype`, `param_dtype`, `remat` (per block); isotropic families also `scan`, and
  their `Family.block_layout` says where the blocks live in either layout.
- parameters are created through `nn.with_logical_partitioning` with names from `AXES`.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax.errors import UserError
from mixer_jax.models.layers import BlockLayout

# The logical axis names a parameter may carry (see parallel.py for the mesh rules).
AXES = (
    "embed",     # model width / channels of a stage
    "mlp",       # hidden width of an MLP (split over the 'model' mesh axis)
    "heads",     # attention heads (split over 'model')
    "tokens",    # a fixed token count (Mixer's token MLP, ResMLP's token linear, ...):
                 # never split by FSDP; adapted on a resolution change
    "classes",   # classifier outputs
    "kernel",    # spatial extent of a convolution or patch; never split
    "channels",  # image channels entering a stem; never split
    "layers",    # the stacked block axis of scanned layouts; never split
    "scalar",    # a size-1 axis (a learnable scalar, a depthwise kernel's input); never split
)

FlatParams = Mapping[str, np.ndarray]  # "a/b/c" -> array (per-block layout)
StateDict = Mapping[str, np.ndarray]   # timm's keys ("blocks.0.norm1.weight") -> array (torch layout)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What the weights expect: pixel statistics (on a 0-1 scale), crop and resize."""

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # (0.5, 0.5): pixels in [-1, 1]
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    input_size: int = 224
    crop_pct: float = 0.875  # eval: resize the shorter side to input_size / crop_pct
    interpolation: str = "bicubic"


IMAGENET = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
INCEPTION = Preprocessing()


@dataclasses.dataclass(frozen=True)
class Family:
    """What the library needs to know about one model family."""

    name: str                                   # "mixer", "resmlp", ...
    module: type[nn.Module]                     # the Flax module every variant builds
    variants: Mapping[str, Mapping[str, Any]]   # model name -> module field values
    architecture: Callable[[FlatParams], dict]  # module fields read from parameter shapes
    classifier: tuple[str, ...] = ("head",)     # flat-key prefixes whose shapes follow num_classes
    from_timm: Callable[[StateDict], dict] | None = None  # timm state dict -> flat params
    to_timm: Callable[[FlatParams], dict] | None = None   # flat params -> timm state dict
    preprocessing: Preprocessing = IMAGENET     # default when the weights say nothing
    timm_names: Mapping[str, str] = dataclasses.field(default_factory=dict)  # our -> timm's name
    # Analytic forward FLOPs of one image (2 x multiply-adds of every Dense/Conv/matmul),
    # by component; the "stem" entry is the one whose input gradient training skips.
    flops: Callable[[nn.Module, tuple[int, int]], dict[str, int]] | None = None
    # Module-field overrides that make a fast test model of the family (fewer blocks,
    # narrower; the first variant's other fields kept): tests/test_registry.py runs every
    # family's tiny model through init/apply, scan, sharding, bfloat16, FSDP and pmap steps.
    tiny: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Isotropic families (a `scan` field): the names of their blocks per block (the
    # layout files hold) and stacked (scan=True). None: no scanned layout (staged families).
    block_layout: BlockLayout | None = None

    def scanned(self, params: Mapping[str, Any]) -> dict:
        """Per-block nested `params` of this family in the layout of its `scan=True` models."""
        if self.block_layout is None:
            raise ScanError(self)
        return self.block_layout.stack(params)


class ScanError(UserError, ValueError):
    """A scanned layout (scan=True) asked of a family that has none."""

    def __init__(self, family: Family):
        super().__init__(f"{family.name} has no scanned layout (only isotropic families stack "
                         "their blocks for nn.scan); use it without scan "
                         "(config.model.scan=False, convert without --scan).")


_FAMILIES: dict[str, Family] = {}
_BY_MODEL: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds `family` and its variants; a name may belong to one family only."""
    taken = [n for n in family.variants if n in _BY_MODEL and _BY_MODEL[n].name != family.name]
    if taken:
        raise ValueError(f"Model name(s) {taken} are already registered by another family.")
    if ("scan" in model_fields(family)) != (family.block_layout is not None):
        raise ValueError(f"Family {family.name}: a module with a `scan` field needs a "
                         "`block_layout` (where its blocks live, per block and scanned), "
                         "and only such a module has one.")
    _FAMILIES[family.name] = family
    _BY_MODEL.update({name: family for name in family.variants})
    return family


def _block_layouts() -> list[BlockLayout]:
    return list(dict.fromkeys(f.block_layout for f in _FAMILIES.values() if f.block_layout))


def per_block(params: Mapping[str, Any]) -> dict:
    """Nested parameters of any family, every scanned block stack unstacked (the layout
    files hold); a per-block tree comes back as it is."""
    params = dict(params)
    for layout in _block_layouts():
        params = layout.unstack(params)
    return params


def stacked_like(params: Mapping[str, Any], like: Mapping[str, Any]) -> dict:
    """Per-block nested `params` in the layout of `like` (a model's parameters or their
    shapes): stacked where `like` holds scanned blocks, else as they are."""
    params = dict(params)
    for layout in _block_layouts():
        if layout.scanned in like:
            params = layout.stack(params)
    return params


def canonical_name(name: str) -> str:
    """'Mixer-B/16' -> 'Mixer-B_16' (Google's names use either separator)."""
    return name.replace("/", "_")


def list_models(pattern: str = "*") -> list[str]:
    """Every registered model name matching the shell-style `pattern`, sorted."""
    return sorted(n for n in _BY_MODEL if fnmatch.fnmatchcase(n, pattern))


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    """The family of a model name ("resmlp_12_224") or a family name ("resmlp")."""
    key = canonical_name(name)
    if key in _BY_MODEL:
        return _BY_MODEL[key]
    if key in _FAMILIES:
        return _FAMILIES[key]
    close = difflib.get_close_matches(key, list(_BY_MODEL), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"Unknown model {name!r}.{hint} `mixer_jax.models.list_models()` lists "
                     "every name.")


def model_fields(family: Family) -> set[str]:
    """The options `create_model` accepts for `family` (its module's fields)."""
    return {f.name for f in dataclasses.fields(family.module)} - {"parent", "name"}


def family_of(model: nn.Module) -> Family:
    """The family whose module `model` is an instance of."""
    for family in _FAMILIES.values():
        if isinstance(model, family.module):
            return family
    raise ValueError(f"{type(model).__name__} is not the module of a registered family.")


def create_model(name: str, **overrides) -> nn.Module:
    """Builds a registered model by name, with any module field overridden.

    `num_classes=None` (or 0, timm's convention) gives pooled features. `scan=False` is
    accepted by every family (those without a scanned layout are always unrolled);
    `scan=True` by isotropic families only (`ScanError` otherwise).
    """
    family = get_family(name)
    known = model_fields(family)
    if "scan" not in known and "scan" in overrides:  # a staged family: always unrolled
        if overrides.pop("scan"):
            raise ScanError(family)
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"Unknown {family.module.__name__} option(s) {sorted(unknown)}; "
                        f"known: {sorted(known)}.")
    if overrides.get("num_classes") == 0:
        overrides["num_classes"] = None
    if overrides.get("num_classes", 1) is not None and overrides.get("num_classes", 1) < 0:
        raise ValueError(f"num_classes must be positive, 0 or None, not {overrides['num_classes']}.")
    return family.module(**{**family.variants[canonical_name(name)], **overrides})


def _init(model: nn.Module, image_shape, rng):
    return model.init(rng, jnp.zeros((1, *image_shape), jnp.float32))["params"]


def init_params(model: nn.Module, rng, image_shape=(224, 224, 3)) -> dict:
    """Fresh parameters of `model` for images of `image_shape` (HWC), axis boxes removed."""
    return nn.meta.unbox(_init(model, image_shape, rng))


def param_shapes(model: nn.Module, image_shape=(224, 224, 3)) -> dict:
    """The parameters of `model` as `jax.ShapeDtypeStruct`s (nothing is computed)."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(_init, model, image_shape),
                                        jax.random.key(0)))


def param_axes(model: nn.Module, image_shape=(224, 224, 3)) -> dict:
    """The logical axis names of every parameter (a tree of tuples), computed abstractly."""
    boxed = jax.eval_shape(functools.partial(_init, model, image_shape), jax.random.key(0))
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
    return jax.tree.map(lambda b: tuple(b.names) if is_box(b) else (None,) * len(b.shape),
                        boxed, is_leaf=is_box)
