"""MLP-Mixer (Tolstikhin et al. 2021) in Flax Linen.

Parameter names follow Google's `vit_jax.models_mixer`, so the parameter tree
*is* the published checkpoint format (`stem`, `MixerBlock_{i}`,
`pre_head_layer_norm`, `head`). With `scan=True` the blocks live stacked under
`MixerBlocks` instead; `stack_blocks`/`unstack_blocks` convert between the two.

The same module runs timm's `MlpMixer` under timm's names (`mixer_b16_224`, ...:
the same parameter tree, `gelu_approximate=False` because timm's `nn.GELU` is the
exact erf form while Google's models were trained with the tanh form) and gMixer
(`gated=True`, see `mixer_jax.models.gmixer`). LayerNorm epsilon is 1e-6 in both.

Regularisation (both off by default, both inverted, i.e. identity at eval):
- `dropout`: after the activation and after the second Dense of every MLP; kept
  units are scaled by 1/(1-p) during training.
- `stoch_depth`: drop-path on every residual branch, per example. Google's names:
  the rate rises linearly over blocks from 0 (first block) to `stoch_depth` (last
  block), as in the paper. timm's names and gMixer (`uniform_drop_path=True`):
  every block uses `stoch_depth`, as timm applies `drop_path_rate` to MlpMixer.
  Kept branches are scaled by 1/(1-p_i).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mixer_jax.models import layers, registry
from mixer_jax.models.layers import (TIMM_NORM, TimmKeyMap, dense, isotropic_forward, layer_norm,
                                     residual, timm_pairs)

Dtype = Any

# name -> (patch_size, num_blocks, hidden_dim, tokens_mlp_dim, channels_mlp_dim)
_VARIANT_TABLE = {
    "Mixer-Ti_4": (4, 2, 64, 32, 128),  # tiny, for tests and the offline demo
    "Mixer-S_32": (32, 8, 512, 256, 2048),
    "Mixer-S_16": (16, 8, 512, 256, 2048),
    "Mixer-S_8": (8, 8, 512, 256, 2048),
    "Mixer-B_32": (32, 12, 768, 384, 3072),
    "Mixer-B_16": (16, 12, 768, 384, 3072),
    "Mixer-L_32": (32, 24, 1024, 512, 4096),
    "Mixer-L_16": (16, 24, 1024, 512, 4096),
    "Mixer-H_14": (14, 32, 1280, 640, 5120),
}
# The architecture fields a variant fixes (checkpoint shapes reveal them all).
MODEL_FIELDS = ("patch_size", "num_blocks", "hidden_dim", "tokens_mlp_dim", "channels_mlp_dim")
VARIANTS: dict[str, dict[str, int]] = {
    name: dict(zip(MODEL_FIELDS, values)) for name, values in _VARIANT_TABLE.items()
}

# The same architectures under timm's names: exact-erf GELU, timm's drop-path rule.
TIMM_NAMES = {f"Mixer-{size}_{patch}": f"mixer_{size.lower()}{patch}_224"
              for size in "SBL" for patch in (32, 16)}
_TIMM_OPTIONS = dict(gelu_approximate=False, uniform_drop_path=True)
FAMILY_VARIANTS = {**VARIANTS, **{timm: {**VARIANTS[google], **_TIMM_OPTIONS}
                                  for google, timm in TIMM_NAMES.items()}}

BLOCK_PREFIX = "MixerBlock_"
SCANNED_BLOCKS = "MixerBlocks"
BLOCKS = layers.BlockLayout(BLOCK_PREFIX, SCANNED_BLOCKS)  # per-block and scanned names


class MlpBlock(nn.Module):
    """Dense -> GELU -> Dense back to the input width.

    GELU is the tanh approximation (`gelu_approximate=True`, as Google trained) or
    the exact erf form (timm). With `gated=True` the MLP is timm's `GluMlp` with
    SiLU (SwiGLU): `Dense_0(x) * silu(gate(x))`, both `mlp_dim` wide (timm's `fc1`
    is the two side by side, `Dense_0` first), then `Dense_1`.
    """

    mlp_dim: int
    axis: str = "embed"  # logical name of the mixed axis: "tokens" or "embed"
    dropout: float = 0.0
    gelu_approximate: bool = True
    gated: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = dense(self.mlp_dim, (self.axis, "mlp"), **kw)(x)
        if self.gated:
            y = y * nn.silu(dense(self.mlp_dim, (self.axis, "mlp"), name="gate", **kw)(x))
        else:
            y = nn.gelu(y, approximate=self.gelu_approximate)
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = dense(x.shape[-1], ("mlp", self.axis), **kw)(y)
        return nn.Dropout(self.dropout, deterministic=not train)(y)


class MixerBlock(nn.Module):
    """Token mixing across patches, then channel mixing across features."""

    tokens_mlp_dim: int
    channels_mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gelu_approximate: bool = True
    gated: bool = False

    @nn.compact
    def __call__(self, x, drop_rate=0.0, train: bool = False):
        kw = dict(dropout=self.dropout, gelu_approximate=self.gelu_approximate, gated=self.gated,
                  dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: layer_norm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        y = norm("LayerNorm_0")(x)
        y = jnp.swapaxes(y, 1, 2)
        y = MlpBlock(self.tokens_mlp_dim, "tokens", name="token_mixing", **kw)(y, train=train)
        y = jnp.swapaxes(y, 1, 2)
        x = residual(self, x, y, drop_rate, train)
        y = norm("LayerNorm_1")(x)
        y = MlpBlock(self.channels_mlp_dim, name="channel_mixing", **kw)(y, train=train)
        return residual(self, x, y, drop_rate, train)


class MlpMixer(nn.Module):
    """MLP-Mixer. Input: images [batch, height, width, 3] in [-1, 1].

    Returns logits [batch, num_classes], or pooled features [batch, hidden_dim]
    when `num_classes` is None. With `return_intermediates=True` returns
    `(output, intermediates)` where intermediates holds the tokens after the
    stem (`stem`, [batch, tokens, hidden]), after every block (`block_{i}`),
    and the pooled `pre_logits`, all from the same single forward pass.
    """

    patch_size: int
    num_blocks: int
    hidden_dim: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    num_classes: int | None = 1000
    dropout: float = 0.0
    stoch_depth: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: bool = False
    gelu_approximate: bool = True  # tanh GELU (Google's weights); False: exact erf (timm's)
    gated: bool = False  # SwiGLU token and channel MLPs (gMixer)
    uniform_drop_path: bool = False  # timm's stochastic-depth rule (see the module docstring)

    def drop_rates(self) -> np.ndarray:
        """Per-block stochastic-depth rates: linear from 0 to `stoch_depth`, or all equal."""
        if self.num_blocks == 1 or self.uniform_drop_path:
            return np.full((self.num_blocks,), self.stoch_depth, np.float32)
        return np.linspace(0.0, self.stoch_depth, self.num_blocks, dtype=np.float32)

    @nn.compact
    def __call__(self, inputs, *, train: bool = False, return_intermediates: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = dict(
            tokens_mlp_dim=self.tokens_mlp_dim, channels_mlp_dim=self.channels_mlp_dim,
            dropout=self.dropout, gelu_approximate=self.gelu_approximate, gated=self.gated, **kw)
        return isotropic_forward(self, inputs, MixerBlock, block,
                                 layer_norm(name="pre_head_layer_norm", **kw), train=train,
                                 return_intermediates=return_intermediates,
                                 layout=BLOCKS,
                                 drop_rates=self.drop_rates())


def stack_blocks(params: dict) -> dict:
    """Per-block layout (`MixerBlock_{i}`) -> scanned layout (`MixerBlocks/block`).

    (MLP-Mixer's and gMixer's; any family's: `Family.block_layout`, `registry.stacked_like`.)
    """
    return BLOCKS.stack(params)


def unstack_blocks(params: dict) -> dict:
    """Scanned layout (`MixerBlocks/block`) -> per-block layout (`MixerBlock_{i}`)."""
    return BLOCKS.unstack(params)


def architecture(flat) -> dict:
    """The `MlpMixer` architecture fields of flat per-block parameters, from their shapes."""
    if any(k.endswith("/gate/kernel") for k in flat):
        raise ValueError("The parameters have gated MLPs ('.../gate/kernel'): they are a gMixer, "
                         "not an MLP-Mixer.")
    return shape_fields(flat)


def shape_fields(flat, family: str = "MLP-Mixer") -> dict:
    """The five architecture fields of flat Mixer-layout parameters (gated or not)."""
    return layers.isotropic_architecture(
        flat, family, BLOCK_PREFIX, "token_mixing/Dense_0",
        widths=(("tokens_mlp_dim", "token_mixing/Dense_0"),
                ("channels_mlp_dim", "channel_mixing/Dense_0")))


# timm's `MlpMixer` state dict (gMixer's too, with its fc1 split: see gmixer.py).
KEYS = TimmKeyMap(
    family="MLP-Mixer", prefix=BLOCK_PREFIX,
    blocks={
        **timm_pairs("LayerNorm_0", "norm1", **TIMM_NORM),
        **timm_pairs("LayerNorm_1", "norm2", **TIMM_NORM),
        **timm_pairs("token_mixing/Dense_0", "mlp_tokens.fc1"),
        **timm_pairs("token_mixing/Dense_1", "mlp_tokens.fc2"),
        **timm_pairs("channel_mixing/Dense_0", "mlp_channels.fc1"),
        **timm_pairs("channel_mixing/Dense_1", "mlp_channels.fc2"),
    },
    top={**timm_pairs("pre_head_layer_norm", "norm", **TIMM_NORM), **timm_pairs("head", "head")},
)


def flops(model: MlpMixer, image_size: tuple[int, int]) -> dict[str, int]:
    """Analytic forward FLOPs of one image (2 x multiply-adds of every Dense/Conv)."""
    height, width = image_size
    if height % model.patch_size or width % model.patch_size:
        raise ValueError(f"Image size {height}x{width} is not divisible by patch size "
                         f"{model.patch_size}.")
    tokens, hidden, p = (height // model.patch_size) * (width // model.patch_size), \
        model.hidden_dim, model.patch_size
    # A Dense of n inputs and k outputs applied to r rows costs 2*r*n*k; each MLP is two
    # of them (in -> mlp_dim -> in), three when gated (value and gate, then out).
    denses = 3 if model.gated else 2
    return {
        "stem": 2 * tokens * p * p * 3 * hidden,
        "token_mixing": model.num_blocks * denses * 2 * hidden * tokens * model.tokens_mlp_dim,
        "channel_mixing": model.num_blocks * denses * 2 * tokens * hidden * model.channels_mlp_dim,
        "head": 2 * hidden * (model.num_classes or 0),
    }


FAMILY = registry.register(registry.Family(
    name="mixer", module=MlpMixer, block_layout=BLOCKS, variants=FAMILY_VARIANTS,
    architecture=architecture, from_timm=KEYS.from_timm, to_timm=KEYS.to_timm,
    timm_names=TIMM_NAMES, preprocessing=registry.INCEPTION, flops=flops,
))
