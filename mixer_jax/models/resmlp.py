"""ResMLP (Touvron et al. 2021) in Flax Linen, as timm runs it (`timm.models.mlp_mixer`).

A block: x + ls1 * TokenLinear(Affine(x)), then x + ls2 * Mlp(Affine(x)), where
Affine(x) = alpha * x + beta (per channel, no statistics), the token linear mixes the
N patches (an N x N Linear, fixed by the image size at init), the MLP is
Linear -> GELU (exact erf) -> Linear with 4x hidden width, and ls1/ls2 are per-channel
layer scales starting at `layer_scale_init` (timm: 1e-4 for depth 12, 1e-5 for 24,
1e-6 for 36 and big-24). A final Affine, the mean over tokens and a Linear head.

Parameters (per-block layout, the one files hold): `stem`, `ResBlock_{i}/{norm1,
linear_tokens, ls1, norm2, mlp_channels/{fc1,fc2}, ls2}`, `norm`, `head`; with
`scan=True` the blocks are stacked under `ResBlocks/block`.

Regularisation (off by default, identity at eval):
- `dropout`: after the GELU and after fc2 of every MLP (timm's `proj_drop_rate`).
- `stoch_depth`: drop-path on both residual branches of every block, all blocks at the
  same rate (timm's `MlpMixer` gives each block `drop_path_rate` itself, no ramp).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mixer_jax.models import registry
from mixer_jax.models.layers import (BlockLayout, Mlp, TimmKeyMap, TokenLinear,
                                     isotropic_architecture, isotropic_forward, patch_grid,
                                     residual, timm_pairs)

Dtype = Any

BLOCK_PREFIX = "ResBlock_"
SCANNED_BLOCKS = "ResBlocks"
BLOCKS = BlockLayout(BLOCK_PREFIX, SCANNED_BLOCKS)  # per-block and scanned names

MODEL_FIELDS = ("patch_size", "num_blocks", "hidden_dim", "mlp_dim", "layer_scale_init")
VARIANTS = {
    name: dict(zip(MODEL_FIELDS, values)) for name, values in {
        "resmlp_12_224": (16, 12, 384, 1536, 1e-4),
        "resmlp_24_224": (16, 24, 384, 1536, 1e-5),
        "resmlp_36_224": (16, 36, 384, 1536, 1e-6),
        "resmlp_big_24_224": (8, 24, 768, 3072, 1e-6),
    }.items()
}


class Affine(nn.Module):
    """alpha * x + beta per channel (ResMLP's normalisation-free 'norm')."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-1],)
        alpha = self.param("alpha", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           shape, self.param_dtype)
        beta = self.param("beta", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                          shape, self.param_dtype)
        x, alpha, beta = nn.dtypes.promote_dtype(x, alpha, beta, dtype=self.dtype)
        return beta + alpha * x


class ResBlock(nn.Module):
    """Token linear and channel MLP, each behind an Affine and scaled by a layer scale."""

    mlp_dim: int
    layer_scale_init: float = 1e-4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _scale(self, name, y):
        ls = self.param(name, nn.with_logical_partitioning(
            nn.initializers.constant(self.layer_scale_init), ("embed",)),
            (y.shape[-1],), self.param_dtype)
        return ls.astype(self.dtype) * y

    @nn.compact
    def __call__(self, x, drop_rate=0.0, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = TokenLinear(name="linear_tokens", **kw)(Affine(name="norm1", **kw)(x))
        x = residual(self, x, self._scale("ls1", y), drop_rate, train)
        y = Mlp(self.mlp_dim, dropout=self.dropout, name="mlp_channels", **kw)(
            Affine(name="norm2", **kw)(x), train=train)
        return residual(self, x, self._scale("ls2", y), drop_rate, train)


class ResMLP(nn.Module):
    """ResMLP. Input: images [batch, height, width, 3], ImageNet mean/std normalised.

    Returns logits [batch, num_classes], or pooled features [batch, hidden_dim] when
    `num_classes` is None; with `return_intermediates=True`, `(output, feats)`:
    'stem' and 'block_{i}' tokens [batch, tokens, hidden_dim], and 'pre_logits'.
    """

    patch_size: int
    num_blocks: int
    hidden_dim: int
    mlp_dim: int
    layer_scale_init: float = 1e-4
    num_classes: int | None = 1000
    dropout: float = 0.0
    stoch_depth: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(mlp_dim=self.mlp_dim, layer_scale_init=self.layer_scale_init,
                     dropout=self.dropout, **kw)
        return isotropic_forward(self, images, ResBlock, block, Affine(name="norm", **kw),
                                 train=train, return_intermediates=return_intermediates,
                                 layout=BLOCKS)


def architecture(flat) -> dict:
    """The `ResMLP` architecture fields of flat per-block parameters, from their shapes.

    `layer_scale_init` is an initial value, not readable from trained weights: left out.
    """
    return isotropic_architecture(flat, "ResMLP", BLOCK_PREFIX, "linear_tokens")


_AFFINE = dict(names=("alpha", "beta"), timm=("alpha", "beta"), layouts=("row", "row"))
KEYS = TimmKeyMap(
    family="ResMLP", prefix=BLOCK_PREFIX,
    blocks={
        **timm_pairs("norm1", "norm1", **_AFFINE),
        **timm_pairs("linear_tokens", "linear_tokens"),
        "ls1": ("ls1", "same"),
        **timm_pairs("norm2", "norm2", **_AFFINE),
        **timm_pairs("mlp_channels/fc1", "mlp_channels.fc1"),
        **timm_pairs("mlp_channels/fc2", "mlp_channels.fc2"),
        "ls2": ("ls2", "same"),
    },
    top={**timm_pairs("norm", "norm", **_AFFINE), **timm_pairs("head", "head")},
)


def flops(model: ResMLP, image_size: tuple[int, int]) -> dict[str, int]:
    """Analytic forward FLOPs of one image (2 x multiply-adds), by component."""
    rows, cols = patch_grid(*image_size, model.patch_size)
    tokens, dim = rows * cols, model.hidden_dim
    return {
        "stem": 2 * tokens * model.patch_size**2 * 3 * dim,
        "token_mixing": model.num_blocks * 2 * tokens * tokens * dim,
        "channel_mixing": model.num_blocks * 2 * 2 * tokens * dim * model.mlp_dim,
        "head": 2 * dim * (model.num_classes or 0),
    }


FAMILY = registry.register(registry.Family(
    name="resmlp", module=ResMLP, block_layout=BLOCKS, variants=VARIANTS,
    architecture=architecture, from_timm=KEYS.from_timm, to_timm=KEYS.to_timm,
    preprocessing=registry.IMAGENET, flops=flops,
    tiny=dict(patch_size=4, num_blocks=4, hidden_dim=64, mlp_dim=256),  # learns the 16x16 digits (>= 98%)
))
