"""Layers shared by several families."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def drop_path(x: jax.Array, rate, rng: jax.Array) -> jax.Array:
    """Zeroes whole examples with probability `rate`, scales the rest by 1/(1-rate)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    # `keep` may be 0 only for rate 1; guard the division.
    return jnp.where(mask, x / jnp.maximum(keep, 1e-12), 0).astype(x.dtype)


def dense(features: int, axes: tuple[str | None, str | None], *, dtype, param_dtype,
          name: str | None = None, use_bias: bool = True,
          kernel_init=nn.initializers.lecun_normal()) -> nn.Dense:
    """`nn.Dense` whose kernel carries logical axes `axes` (in, out), its bias `axes[1]`."""
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


def layer_norm(axis: str = "embed", *, dtype, param_dtype, name: str | None = None,
               epsilon: float = 1e-6, use_bias: bool = True) -> nn.LayerNorm:
    """`nn.LayerNorm` over the last axis, whose scale and bias carry logical axis `axis`."""
    return nn.LayerNorm(
        epsilon=epsilon, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis,)))


# --- Isotropic families built like timm's `MlpMixer` (MLP-Mixer, gMixer, ResMLP, gMLP) ----

def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """The (rows, cols) of non-overlapping patches; ValueError if the patch doesn't divide."""
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"Image size {height}x{width} is not divisible by the patch size {patch_size}; "
            "resize or crop the images to a multiple of it.")
    return height // patch_size, width // patch_size


def patch_embed(images, patch_size: int, features: int, *, dtype, param_dtype,
                name: str = "stem"):
    """Non-overlapping patches -> tokens [B, rows * cols, features] (raster order)."""
    patch_grid(*images.shape[1:3], patch_size)
    x = nn.Conv(
        features, (patch_size, patch_size), strides=(patch_size, patch_size), padding="VALID",
        dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("kernel", "kernel", "channels", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )(images)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def residual(module: nn.Module, x, y, drop_rate, train: bool):
    """x + y, with y dropped per example (drop-path) at `drop_rate` while training."""
    if train and not (isinstance(drop_rate, (int, float)) and drop_rate == 0):
        y = drop_path(y, drop_rate, module.make_rng("dropout"))
    return x + y


class TokenLinear(nn.Module):
    """A Linear across the token axis of [B, N, C] (timm: `Linear(N, N)` on `x.transpose(1, 2)`).

    kernel [N_in, N_out] ("tokens", "tokens"), bias [N_out] ("tokens",). N is fixed by
    the image size at init; another token count raises a ValueError saying so.
    """

    kernel_init: Callable = nn.initializers.xavier_uniform()
    bias_init: Callable = nn.initializers.zeros
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        tokens = x.shape[-2]
        if self.has_variable("params", "kernel"):
            expected = nn.meta.unbox(self.get_variable("params", "kernel")).shape[0]
            if expected != tokens:
                raise ValueError(
                    f"The input has {tokens} tokens (patches) but the parameters of "
                    f"{self.path_text()} mix {expected}: feed images of the size the model was "
                    "initialised with, or adapt the parameters to the new size first "
                    "(fine-tuning at another resolution).")
        kernel = self.param("kernel", nn.with_logical_partitioning(
            self.kernel_init, ("tokens", "tokens")), (tokens, tokens), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, ("tokens",)),
                          (tokens,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.einsum("...nc,nm->...mc", x, kernel) + bias[:, None]

    def path_text(self) -> str:
        return "/".join(self.scope.path) if self.scope is not None else self.name


class Mlp(nn.Module):
    """timm's `Mlp` / `GatedMlp`: fc1 -> GELU (exact erf) -> dropout -> [gate] -> fc2 -> dropout.

    `gate` (a module factory, called as `gate(name="gate", dtype=..., param_dtype=...)`)
    maps the hidden activations to half their width (gMLP's spatial gating unit).
    Linear kernels start as timm's (Xavier uniform); biases at zero (timm: N(0, 1e-6)).
    """

    hidden_dim: int
    gate: Callable[..., nn.Module] | None = None
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=nn.initializers.xavier_uniform())
        y = dense(self.hidden_dim, ("embed", "mlp"), name="fc1", **kw)(x)
        y = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(y, approximate=False))
        if self.gate is not None:
            y = self.gate(name="gate", dtype=self.dtype, param_dtype=self.param_dtype)(y)
        y = dense(x.shape[-1], ("mlp", "embed"), name="fc2", **kw)(y)
        return nn.Dropout(self.dropout, deterministic=not train)(y)


class _ScanBody(nn.Module):
    """One block shaped for `nn.scan`: (tokens, drop_rate) -> (tokens, tokens)."""

    block_cls: Any
    block: dict[str, Any]
    train: bool
    stochastic: bool

    @nn.compact
    def __call__(self, x, drop_rate):
        rate = drop_rate if self.stochastic else 0.0
        x = self.block_cls(**self.block, name="block")(x, rate, self.train)
        return x, x


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """Where an isotropic family keeps its blocks' parameters.

    Per block (the layout files hold): block i under f"{prefix}{i}". Scanned
    (`scan=True` models): all blocks stacked under f"{scanned}/block", leading "layers" axis.
    `stack`/`unstack` convert nested parameters (numpy or jax arrays); a tree already in
    the target layout, or without these blocks, comes back unchanged.
    """

    prefix: str   # "MixerBlock_"
    scanned: str  # "MixerBlocks"

    def stack(self, params: Mapping[str, Any]) -> dict:
        """Per-block layout -> the scanned layout."""
        prefix = self.prefix
        names = sorted((k for k in params if k.startswith(prefix) and k[len(prefix):].isdigit()),
                       key=lambda k: int(k[len(prefix):]))
        if not names:
            return dict(params)
        out = {k: v for k, v in params.items() if k not in names}
        out[self.scanned] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs),
                                                   *[params[k] for k in names])}
        return out

    def unstack(self, params: Mapping[str, Any]) -> dict:
        """The scanned layout -> per-block layout."""
        if self.scanned not in params:
            return dict(params)
        stacked = params[self.scanned]["block"]
        out = {k: v for k, v in params.items() if k != self.scanned}
        for i in range(jax.tree.leaves(stacked)[0].shape[0]):
            out[f"{self.prefix}{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
        return out


def isotropic_blocks(block_cls, block: dict[str, Any], x, drop_rates, *, train: bool,
                     scan: bool, remat: bool, layout: BlockLayout):
    """Applies `len(drop_rates)` blocks `block_cls(**block)(x, drop_rate, train)` in turn.

    Named as `layout` says: unrolled, block i is f"{layout.prefix}{i}"; with `scan`, the
    blocks are stacked under `layout.scanned/block`. `remat` checkpoints each block.
    Call from a compact method. Returns (tokens, {"block_{i}": tokens after block i}).
    """
    num_blocks = len(drop_rates)
    if scan:
        body = nn.remat(_ScanBody) if remat else _ScanBody
        x, per_block = nn.scan(
            body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
            length=num_blocks, metadata_params={nn.PARTITION_NAME: "layers"},
        )(block_cls=block_cls, block=block, train=train, stochastic=bool(np.any(drop_rates > 0)),
          name=layout.scanned)(x, jnp.asarray(drop_rates))
        return x, {f"block_{i}": per_block[i] for i in range(num_blocks)}
    cls = nn.remat(block_cls, static_argnums=(2, 3)) if remat else block_cls
    feats = {}
    for i in range(num_blocks):
        x = cls(**block, name=f"{layout.prefix}{i}")(x, float(drop_rates[i]), train)
        feats[f"block_{i}"] = x
    return x, feats


# timm's tensor layouts -> (ours from timm's, timm's from ours) on numpy arrays. They
# return views (no copy; writers make them contiguous), so abstract shapes convert too.
TIMM_LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "same": (np.asarray, np.asarray),
    # Linear weight [out, in] <-> Dense kernel [in, out]
    "linear": (lambda w: np.asarray(w).T, lambda k: np.asarray(k).T),
    # Conv2d weight [out, in, kh, kw] <-> Conv kernel [kh, kw, in, out]
    "conv": (lambda w: np.asarray(w).transpose(2, 3, 1, 0),
             lambda k: np.asarray(k).transpose(3, 2, 0, 1)),
    # a per-channel vector timm keeps as [1, 1, C] (ResMLP's Affine) <-> [C]
    "row": (lambda a: np.asarray(a).reshape(np.shape(a)[-1]),
            lambda a: np.asarray(a).reshape(1, 1, -1)),
}


def timm_pairs(ours: str, theirs: str, names=("kernel", "bias"), timm=("weight", "bias"),
               layouts=("linear", "same")) -> dict[str, tuple[str, str]]:
    """Key-map entries of one layer: f"{ours}/{name}" -> (f"{theirs}.{timm name}", layout)."""
    return {f"{ours}/{n}": (f"{theirs}.{t}", layout) for n, t, layout in zip(names, timm, layouts)}


TIMM_NORM = dict(names=("scale", "bias"), layouts=("same", "same"))  # nn.LayerNorm <-> torch's


TIMM_STEM = timm_pairs("stem", "stem.proj", layouts=("conv", "same"))  # `patch_embed`'s conv


@dataclasses.dataclass(frozen=True)
class TimmKeyMap:
    """timm's state dict <-> flat params of a model built like timm's `MlpMixer`.

    Block i: timm `blocks.{i}.<suffix>` <-> f"{prefix}{i}/<ours>" (`blocks`: ours ->
    (suffix, layout)); the stem and `top` (final norm, head): ours -> (timm key, layout).
    Keys under `classifier` may be absent together (a headless model). Both directions
    give the keys in the map's order (stem, each block in turn, `top`) and are exact
    inverses on numpy arrays (dtype kept).
    """

    family: str
    prefix: str
    blocks: Mapping[str, tuple[str, str]]
    top: Mapping[str, tuple[str, str]]
    stem: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=lambda: TIMM_STEM)
    classifier: tuple[str, ...] = ("head",)

    def from_timm(self, state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
        top = {timm: (ours, layout) for ours, (timm, layout) in {**self.stem, **self.top}.items()}
        block = {timm: (ours, layout) for ours, (timm, layout) in self.blocks.items()}
        out = {}
        for key, value in state_dict.items():
            match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
            if match and match.group(2) in block:
                ours, layout = block[match.group(2)]
                ours = f"{self.prefix}{match.group(1)}/{ours}"
            elif key in top:
                ours, layout = top[key]
            else:
                raise ValueError(f"Unknown key {key!r} in a timm state dict for {self.family}: "
                                 "the file holds another architecture.")
            out[ours] = TIMM_LAYOUTS[layout][0](value)
        return {k: out[k] for k in self._expected(out, "timm state dict", self.to_timm_key)}

    def to_timm(self, flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
        layouts = {key: self._lookup(key)[1] for key in flat}  # unknown keys raise here
        return {self.to_timm_key(k): TIMM_LAYOUTS[layouts[k]][1](flat[k])
                for k in self._expected(flat, "parameter tree", lambda k: k)}

    def to_timm_key(self, key: str) -> str:
        return self._lookup(key)[0]

    def _lookup(self, key: str) -> tuple[str, str]:
        match = re.fullmatch(rf"{re.escape(self.prefix)}(\d+)/(.+)", key)
        if match and match.group(2) in self.blocks:
            suffix, layout = self.blocks[match.group(2)]
            return f"blocks.{match.group(1)}.{suffix}", layout
        if key in self.stem or key in self.top:
            return {**self.stem, **self.top}[key]
        raise ValueError(f"Unknown parameter {key!r} for {self.family} (per-block layout "
                         f"expected: {self.prefix}<i>/...).")

    def _expected(self, flat: Mapping[str, Any], what: str, name: Callable) -> list[str]:
        """Our keys of a model with as many blocks (and a head) as `flat`, in the map's order.

        ValueError naming the first one `flat` lacks.
        """
        indices = {int(m.group(1)) for k in flat
                   if (m := re.match(rf"{re.escape(self.prefix)}(\d+)/", k))}
        headless = not any(k.split("/")[0] in self.classifier for k in flat)
        expected = [*self.stem, *(f"{self.prefix}{i}/{k}"
                                  for i in range(max(indices, default=0) + 1) for k in self.blocks),
                    *(k for k in self.top if not (headless and k.split("/")[0] in self.classifier))]
        missing = [k for k in expected if k not in flat]
        if missing:
            raise ValueError(f"Missing key {name(missing[0])!r} in the {what} for {self.family} "
                             f"({len(missing)} missing): truncated or another architecture.")
        return expected


def isotropic_architecture(flat: Mapping[str, Any], family: str, prefix: str, token_mixer: str,
                           widths=(("mlp_dim", "mlp_channels/fc1"),)) -> dict[str, int]:
    """patch_size, num_blocks, hidden_dim and the MLP widths of flat per-block params.

    `widths`: (field, path of a Dense in block 0) pairs; the field is that Dense's
    output width. ValueError unless block 0 has `token_mixer` (its kernel), the stem and
    those Denses, i.e. the tree is `family`'s.
    """
    needed = [f"{prefix}0/{token_mixer}/kernel", "stem/kernel",
              *(f"{prefix}0/{path}/kernel" for _, path in widths)]
    missing = next((k for k in needed if k not in flat), None)
    if missing:
        raise ValueError(f"Not a {family} parameter tree: no {missing} (expected the per-block "
                         f"layout {prefix}<i>/...).")
    stem = flat["stem/kernel"].shape
    return dict(patch_size=stem[0],
                num_blocks=len({k.split("/")[0] for k in flat if k.startswith(prefix)}),
                hidden_dim=stem[-1], **{field: flat[f"{prefix}0/{path}/kernel"].shape[1] for field, path in widths})


def isotropic_forward(model: nn.Module, images, block_cls, block: dict[str, Any],
                      norm: nn.Module, *, train: bool, return_intermediates: bool,
                      layout: BlockLayout, drop_rates: np.ndarray | None = None):
    """The forward pass of a family built like timm's `MlpMixer`, from `model`'s fields.

    patch stem -> `num_blocks` x `block_cls(**block)` -> `norm` -> mean over tokens ->
    `head` (when `num_classes` is set). Stochastic depth: block i's residual branches
    drop at `drop_rates[i]`; by default as timm's `MlpMixer` applies `drop_path_rate`,
    every block at the same rate `stoch_depth`. Call from `model`'s compact `__call__`.
    """
    x = patch_embed(images, model.patch_size, model.hidden_dim, dtype=model.dtype,
                    param_dtype=model.param_dtype)
    feats = {"stem": x}
    if drop_rates is None:
        drop_rates = np.full((model.num_blocks,), model.stoch_depth, np.float32)
    x, per_block = isotropic_blocks(block_cls, block, x, drop_rates, train=train, scan=model.scan,
                                    remat=model.remat, layout=layout)
    feats.update(per_block)
    x = jnp.mean(norm(x), axis=1)
    feats["pre_logits"] = x
    if model.num_classes is not None:
        x = dense(model.num_classes, ("embed", "classes"), kernel_init=nn.initializers.zeros,
                  dtype=model.dtype, param_dtype=model.param_dtype, name="head")(x)
    return (x, feats) if return_intermediates else x
