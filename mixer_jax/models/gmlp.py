"""gMLP (Liu et al. 2021) in Flax Linen, as timm runs it (`timm.models.mlp_mixer`).

A block has one residual: x + GatedMlp(LayerNorm(x)), where GatedMlp is
fc1 (to `mlp_dim`, 6x the width) -> GELU (exact erf) -> spatial gating unit -> fc2,
and the spatial gating unit splits the hidden channels in halves u, v and returns
u * TokenLinear(LayerNorm(v)): a Linear across the N patches (fixed by the image size
at init) whose weight starts near 0 (N(0, 1e-6)) and bias at 1, so every block
starts close to fc2(u). Block and final LayerNorms use epsilon 1e-6 (timm's
`MlpMixer` norm); the gating unit's LayerNorm uses PyTorch's default 1e-5, as timm.

Parameters (per-block layout, the one files hold): `stem`,
`SpatialGatingBlock_{i}/{norm, mlp_channels/{fc1, gate/{norm, proj}, fc2}}`, `norm`,
`head`; with `scan=True` the blocks are stacked under `SpatialGatingBlocks/block`.

Regularisation (off by default, identity at eval):
- `dropout`: after the GELU and after fc2 of every gated MLP (timm's `proj_drop_rate`).
- `stoch_depth`: drop-path on every block's residual branch, all blocks at the same
  rate (timm's `MlpMixer` gives each block `drop_path_rate` itself, no ramp).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mixer_jax.models import registry
from mixer_jax.models.layers import (TIMM_NORM, BlockLayout, Mlp, TimmKeyMap, TokenLinear,
                                     isotropic_architecture, isotropic_forward, layer_norm,
                                     patch_grid, residual, timm_pairs)

Dtype = Any

BLOCK_PREFIX = "SpatialGatingBlock_"
SCANNED_BLOCKS = "SpatialGatingBlocks"
BLOCKS = BlockLayout(BLOCK_PREFIX, SCANNED_BLOCKS)  # per-block and scanned names

MODEL_FIELDS = ("patch_size", "num_blocks", "hidden_dim", "mlp_dim")
VARIANTS = {
    name: dict(zip(MODEL_FIELDS, values)) for name, values in {
        "gmlp_ti16_224": (16, 30, 128, 768),
        "gmlp_s16_224": (16, 30, 256, 1536),
        "gmlp_b16_224": (16, 30, 512, 3072),
    }.items()
}
GATE_EPSILON = 1e-5  # the gating unit's LayerNorm: PyTorch's default, as timm builds it


class SpatialGatingUnit(nn.Module):
    """u * TokenLinear(LayerNorm(v)) for the channel halves (u, v) of its input."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        u, v = jnp.split(x, 2, axis=-1)
        v = layer_norm("mlp", epsilon=GATE_EPSILON, name="norm", **kw)(v)
        v = TokenLinear(kernel_init=nn.initializers.normal(1e-6),
                        bias_init=nn.initializers.ones, name="proj", **kw)(v)
        return u * v


class SpatialGatingBlock(nn.Module):
    """x + GatedMlp(LayerNorm(x)): one residual per block."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, drop_rate=0.0, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = layer_norm(name="norm", **kw)(x)
        y = Mlp(self.mlp_dim, gate=SpatialGatingUnit, dropout=self.dropout,
                name="mlp_channels", **kw)(y, train=train)
        return residual(self, x, y, drop_rate, train)


class GMLP(nn.Module):
    """gMLP. Input: images [batch, height, width, 3] in [-1, 1] (timm's default config).

    Returns logits [batch, num_classes], or pooled features [batch, hidden_dim] when
    `num_classes` is None; with `return_intermediates=True`, `(output, feats)`:
    'stem' and 'block_{i}' tokens [batch, tokens, hidden_dim], and 'pre_logits'.
    """

    patch_size: int
    num_blocks: int
    hidden_dim: int
    mlp_dim: int
    num_classes: int | None = 1000
    dropout: float = 0.0
    stoch_depth: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
        if self.mlp_dim % 2:
            raise ValueError(f"gMLP's mlp_dim must be even (the gating unit halves it), "
                             f"not {self.mlp_dim}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(mlp_dim=self.mlp_dim, dropout=self.dropout, **kw)
        return isotropic_forward(self, images, SpatialGatingBlock, block,
                                 layer_norm(name="norm", **kw), train=train,
                                 return_intermediates=return_intermediates,
                                 layout=BLOCKS)


def architecture(flat) -> dict:
    """The `GMLP` architecture fields of flat per-block parameters, from their shapes."""
    return isotropic_architecture(flat, "gMLP", BLOCK_PREFIX, "mlp_channels/gate/proj")


KEYS = TimmKeyMap(
    family="gMLP", prefix=BLOCK_PREFIX,
    blocks={
        **timm_pairs("norm", "norm", **TIMM_NORM),
        **timm_pairs("mlp_channels/fc1", "mlp_channels.fc1"),
        **timm_pairs("mlp_channels/gate/norm", "mlp_channels.gate.norm", **TIMM_NORM),
        **timm_pairs("mlp_channels/gate/proj", "mlp_channels.gate.proj"),
        **timm_pairs("mlp_channels/fc2", "mlp_channels.fc2"),
    },
    top={**timm_pairs("norm", "norm", **TIMM_NORM), **timm_pairs("head", "head")},
)


def flops(model: GMLP, image_size: tuple[int, int]) -> dict[str, int]:
    """Analytic forward FLOPs of one image (2 x multiply-adds), by component."""
    rows, cols = patch_grid(*image_size, model.patch_size)
    tokens, dim, half = rows * cols, model.hidden_dim, model.mlp_dim // 2
    return {
        "stem": 2 * tokens * model.patch_size**2 * 3 * dim,
        "channel_mixing": model.num_blocks * 2 * tokens * (dim * model.mlp_dim + half * dim),
        "spatial_gating": model.num_blocks * 2 * tokens * tokens * half,
        "head": 2 * dim * (model.num_classes or 0),
    }


FAMILY = registry.register(registry.Family(
    name="gmlp", module=GMLP, block_layout=BLOCKS, variants=VARIANTS,
    architecture=architecture, from_timm=KEYS.from_timm, to_timm=KEYS.to_timm,
    preprocessing=registry.INCEPTION, flops=flops,
    tiny=dict(patch_size=4, num_blocks=2, hidden_dim=64, mlp_dim=256),  # learns the 16x16 digits (>= 98%)
))
