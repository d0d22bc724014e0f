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
import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax.models import registry
from mixer_jax.models.layers import dense, drop_path, layer_norm

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

    def _residual(self, x, y, drop_rate, train):
        if train and not (isinstance(drop_rate, (int, float)) and drop_rate == 0):
            y = drop_path(y, drop_rate, self.make_rng("dropout"))
        return x + y

    @nn.compact
    def __call__(self, x, drop_rate=0.0, train: bool = False):
        kw = dict(dropout=self.dropout, gelu_approximate=self.gelu_approximate, gated=self.gated,
                  dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: layer_norm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        y = norm("LayerNorm_0")(x)
        y = jnp.swapaxes(y, 1, 2)
        y = MlpBlock(self.tokens_mlp_dim, "tokens", name="token_mixing", **kw)(y, train=train)
        y = jnp.swapaxes(y, 1, 2)
        x = self._residual(x, y, drop_rate, train)
        y = norm("LayerNorm_1")(x)
        y = MlpBlock(self.channels_mlp_dim, name="channel_mixing", **kw)(y, train=train)
        return self._residual(x, y, drop_rate, train)


class _ScanBody(nn.Module):
    """MixerBlock shaped for `nn.scan`: (carry, drop_rate) -> (carry, tokens)."""

    block: dict[str, Any]
    train: bool
    stochastic: bool

    @nn.compact
    def __call__(self, x, drop_rate):
        rate = drop_rate if self.stochastic else 0.0
        x = MixerBlock(**self.block, name="block")(x, rate, self.train)
        return x, x


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
        height, width = inputs.shape[1:3]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by the patch size "
                f"{self.patch_size}; resize or crop the images to a multiple of it."
            )
        p = self.patch_size
        x = nn.Conv(
            self.hidden_dim, (p, p), strides=(p, p), padding="VALID",
            dtype=self.dtype, param_dtype=self.param_dtype, name="stem",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("kernel", "kernel", "channels", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        )(inputs)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # raster order: n (h w) c
        feats = {"stem": x}

        block = dict(
            tokens_mlp_dim=self.tokens_mlp_dim, channels_mlp_dim=self.channels_mlp_dim,
            dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
            gelu_approximate=self.gelu_approximate, gated=self.gated,
        )
        rates = self.drop_rates()
        if self.scan:
            body = nn.remat(_ScanBody) if self.remat else _ScanBody
            x, per_block = nn.scan(
                body,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                length=self.num_blocks,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(block=block, train=train, stochastic=self.stoch_depth > 0, name=SCANNED_BLOCKS)(x, jnp.asarray(rates))
            feats.update({f"block_{i}": per_block[i] for i in range(self.num_blocks)})
        else:
            block_cls = (
                nn.remat(MixerBlock, static_argnums=(2, 3)) if self.remat else MixerBlock
            )
            for i in range(self.num_blocks):
                x = block_cls(**block, name=f"{BLOCK_PREFIX}{i}")(x, float(rates[i]), train)
                feats[f"block_{i}"] = x

        x = layer_norm(dtype=self.dtype, param_dtype=self.param_dtype,
                       name="pre_head_layer_norm")(x)
        x = jnp.mean(x, axis=1)
        feats["pre_logits"] = x
        if self.num_classes is not None:
            x = dense(self.num_classes, ("embed", "classes"), kernel_init=nn.initializers.zeros,
                      dtype=self.dtype, param_dtype=self.param_dtype, name="head")(x)
        return (x, feats) if return_intermediates else x


def stack_blocks(params: dict) -> dict:
    """Per-block layout (`MixerBlock_{i}`) -> scanned layout (`MixerBlocks/block`)."""
    names = sorted((k for k in params if k.startswith(BLOCK_PREFIX)),
                   key=lambda k: int(k[len(BLOCK_PREFIX):]))
    if not names:
        return dict(params)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[k] for k in names])
    out = {k: v for k, v in params.items() if not k.startswith(BLOCK_PREFIX)}
    out[SCANNED_BLOCKS] = {"block": stacked}
    return out


def unstack_blocks(params: dict) -> dict:
    """Scanned layout (`MixerBlocks/block`) -> per-block layout (`MixerBlock_{i}`)."""
    if SCANNED_BLOCKS not in params:
        return dict(params)
    stacked = params[SCANNED_BLOCKS]["block"]
    num_blocks = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != SCANNED_BLOCKS}
    for i in range(num_blocks):
        out[f"{BLOCK_PREFIX}{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def architecture(flat) -> dict:
    """The `MlpMixer` architecture fields of flat per-block parameters, from their shapes."""
    if any(k.endswith("/gate/kernel") for k in flat):
        raise ValueError("The parameters have gated MLPs ('.../gate/kernel'): they are a gMixer, "
                         "not an MLP-Mixer.")
    return shape_fields(flat)


def shape_fields(flat) -> dict:
    """The five architecture fields of flat Mixer-layout parameters (gated or not)."""
    for key in ("stem/kernel", f"{BLOCK_PREFIX}0/token_mixing/Dense_0/kernel",
                f"{BLOCK_PREFIX}0/channel_mixing/Dense_0/kernel"):
        if key not in flat:
            raise ValueError(f"The parameters have no {key!r}: they are not an MLP-Mixer.")
    blocks = {int(k.split("/")[0][len(BLOCK_PREFIX):]) for k in flat if k.startswith(BLOCK_PREFIX)}
    token = flat[f"{BLOCK_PREFIX}0/token_mixing/Dense_0/kernel"].shape
    return dict(patch_size=flat["stem/kernel"].shape[0], num_blocks=len(blocks),
                hidden_dim=flat["stem/kernel"].shape[-1], tokens_mlp_dim=token[1],
                channels_mlp_dim=flat[f"{BLOCK_PREFIX}0/channel_mixing/Dense_0/kernel"].shape[1])


# ------------------------------------------------------------------ timm's state dict
# Layouts: a Linear's weight is [out, in] (our kernel [in, out]); a Conv2d's weight is
# [out, in, kh, kw] (ours [kh, kw, in, out]). Both directions are transposes: bitwise.
_LAYOUTS = {
    "linear": ((1, 0), (1, 0)),  # (ours -> timm, timm -> ours) axis permutations
    "conv": ((3, 2, 0, 1), (2, 3, 1, 0)),
    "copy": (None, None),
}


def _timm_key_pairs(num_blocks: int, head: bool) -> list[tuple[str, str, str]]:
    """(our flat key, timm's key, layout) for every parameter of timm's MlpMixer."""
    def affine(ours, theirs, layout="copy", weight="scale"):
        return [(f"{ours}/{weight}", f"{theirs}.weight", layout), (f"{ours}/bias", f"{theirs}.bias", "copy")]

    pairs = affine("stem", "stem.proj", "conv", "kernel")
    for i in range(num_blocks):
        ours, theirs = f"{BLOCK_PREFIX}{i}", f"blocks.{i}"
        pairs += affine(f"{ours}/LayerNorm_0", f"{theirs}.norm1")
        pairs += affine(f"{ours}/LayerNorm_1", f"{theirs}.norm2")
        for mlp, timm_mlp in (("token_mixing", "mlp_tokens"), ("channel_mixing", "mlp_channels")):
            for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
                pairs += affine(f"{ours}/{mlp}/{dense}", f"{theirs}.{timm_mlp}.{fc}", "linear", "kernel")
    pairs += affine("pre_head_layer_norm", "norm")
    return pairs + (affine("head", "head", "linear", "kernel") if head else [])


def _convert(arrays, pairs, source: int, what: str) -> dict:
    """Renames and re-lays out `arrays` along `pairs` (source 0: ours -> timm, 1: timm -> ours)."""
    expected = [pair[source] for pair in pairs]
    missing = next((k for k in expected if k not in arrays), None)
    if missing:
        raise ValueError(f"{what} has no {missing!r}.")
    unknown = next((k for k in arrays if k not in set(expected)), None)
    if unknown:
        raise ValueError(f"{what} has {unknown!r}, which is not a parameter of timm's MlpMixer.")
    out = {}
    for pair in pairs:
        axes = _LAYOUTS[pair[2]][source]
        value = np.asarray(arrays[pair[source]])
        out[pair[1 - source]] = value if axes is None else value.transpose(axes)
    return out


def _num_blocks(keys, pattern: str) -> int:
    return len({k.split(pattern)[1].split(".")[0].split("/")[0] for k in keys if pattern in k})


def from_timm(state_dict) -> dict:
    """timm's MlpMixer state dict -> flat parameters (per-block layout)."""
    pairs = _timm_key_pairs(_num_blocks(state_dict, "blocks."), "head.weight" in state_dict)
    return _convert(state_dict, pairs, 1, "The state dict")


def to_timm(flat) -> dict:
    """Flat parameters (per-block layout) -> timm's MlpMixer state dict."""
    pairs = _timm_key_pairs(_num_blocks(flat, BLOCK_PREFIX), "head/kernel" in flat)
    return _convert(flat, pairs, 0, "The parameters")


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
    name="mixer", module=MlpMixer, variants=FAMILY_VARIANTS, architecture=architecture,
    from_timm=from_timm, to_timm=to_timm, timm_names=TIMM_NAMES,
    preprocessing=registry.INCEPTION, flops=flops,
))
