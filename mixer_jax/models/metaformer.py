"""The MetaFormer line (Yu et al. 2022, 2023) in Flax Linen: one staged skeleton.

PoolFormer v1 (`poolformer_*`), PoolFormer v2 (`poolformerv2_*`), ConvFormer
(`convformer_*`), CAFormer (`caformer_*`), IdentityFormer (`identityformer_*`) and
RandFormer (`randformer_*`) are one module, `MetaFormer`, with different token mixers,
norms and heads; each line is a registered family of its own (their parameter trees
can coincide: PoolFormer v2 and IdentityFormer differ only in the parameter-free mixer).

Skeleton (as timm's `timm/models/metaformer.py`, numerics and epsilons included):
stem conv 7x7 / stride 4 / padding 2 (then a norm, except v1) -> 4 stages; stages 2-4
start with norm -> conv 3x3 / stride 2 / padding 1 (no downsampling where the width
does not change, as timm) -> blocks `x = r1*x + s1*mixer(norm1(x)); x = r2*x +
s2*mlp(norm2(x))` (layer scale s, res scale r, where the variant has them) -> global
mean -> LayerNorm (eps 1e-6) -> dropout -> Linear, or ConvFormer/CAFormer's MLP head
(fc1 -> squared ReLU -> LayerNorm -> dropout -> fc2).
- PoolFormer v1: GroupNorm(1 group) with bias, eps 1e-5; no norm in stem/downsampling;
  GELU (exact) MLP with biases; layer scale (1e-5 for s12/s24, 1e-6 otherwise).
- v2 and the baselines: bias-free norms, eps 1e-6 (GroupNorm(1) for PoolFormer v2,
  IdentityFormer, RandFormer; channel LayerNorm for ConvFormer/CAFormer); StarReLU
  (`s * relu(x)**2 + b`, learnable scalars s, b) bias-free MLPs; res scale in stages 3-4.
- mixers: pooling `avgpool3x3(x) - x` (padding not counted); SepConv (pw -> StarReLU ->
  depthwise 7x7 -> pw, no biases); attention (head dim 32, no biases); identity;
  random mixing (RandFormer, stages 3-4: `x <- M @ x` over the tokens, M frozen).

Input sizes: any image at least as large as the stem kernel minus its padding: every
conv rounds down as PyTorch's does, so sizes that are not multiples of 32 give the same
feature-map shapes as timm (224 -> 56, 28, 14, 7; 100 -> 25, 13, 7, 4). Too small an
image raises ValueError.

RandFormer's frozen matrices: `softmax(uniform(N, N), axis=-1)` drawn at init from the
"params" rng, N the stage's token count at the init image size (official code: 196 and 49,
i.e. 224x224). They live in the Flax collection "frozen" (`variables["frozen"]`), not in
"params", so optimizers, weight decay and gradients never see them; apply with
`{"params": ..., "frozen": ...}` (`registry.as_variables(params, constants)`). The
library carries them as the model's constants (`registry.split_variables`): the training
state's `constants` field (replicated on meshes, never updated), a `constants/` item
`{"frozen": ...}` next to `params/` in every orbax checkpoint (training runs and `convert`;
`train_checkpoint.restore_variables` reads both back), and fine-tuning (`load_pretrained`
with the model's variables) and `predict` take them from the file unchanged. The official
`.pth` holds them as `stages.{i}.{j}.token_mixer.random_matrix` (`from_official`,
`mixer_jax.official_weights`). Their keys are what tells a RandFormer tree from an
IdentityFormer one (`_architecture` reads parameters and constants in one namespace,
`checkpoint.flatten_variables`). Another input size is refused with a ValueError naming
the fixed token count (a random mixing matrix has no meaningful resize; initialise a new
model at the new size for new random matrices); fine-tuning a file at another image size
is refused likewise.

Regularisation (identity at eval):
- `stoch_depth`: drop-path on both residual branches of every block, the rate rising
  linearly from 0 (first block) to `stoch_depth` (last block) over all blocks of all
  stages, as timm's `drop_path_rate` (`linspace(0, rate, sum(depths))`).
- `dropout`: on the pooled, normalised features before the head (timm's `drop_rate`).
- `head_dropout`: inside the MLP head, before fc2 (official code's `head_dropout`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax.models import registry
from mixer_jax.models import metaformer_keys as keys
from mixer_jax.models.layers import dense, drop_path, layer_norm

Dtype = Any
FROZEN = "frozen"  # the variable collection holding RandFormer's mixing matrices
MIXERS = ("pooling", "sepconv", "attention", "identity", "random")
ATTENTION_HEAD_DIM = 32
_INIT = nn.initializers.truncated_normal(0.02)  # timm's trunc_normal_(std=.02)


def _conv(features, kernel, axes, *, stride=1, padding=0, dtype, param_dtype, name):
    return nn.Conv(
        features, (kernel, kernel), strides=stride, padding=[(padding, padding)] * 2,
        dtype=dtype, param_dtype=param_dtype,
        name=name, kernel_init=nn.with_logical_partitioning(_INIT, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]))


def _norm(kind: str, *, use_bias: bool, eps: float, dtype, param_dtype, name):
    """'group': GroupNorm(1 group) over H, W, C; 'layer': LayerNorm over C; NHWC or NLC."""
    if kind == "layer":
        return layer_norm(dtype=dtype, param_dtype=param_dtype, name=name, epsilon=eps,
                          use_bias=use_bias)
    return nn.GroupNorm(
        num_groups=1, epsilon=eps, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        name=name, use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def _pool_counts(size: int) -> np.ndarray:
    """How many of the 3 taps centred on each of `size` positions are inside the image."""
    counts = np.full(size, 3.0)
    counts[0] -= 1
    counts[-1] -= 1
    return np.maximum(counts, 1.0)  # a size-1 axis: the centre tap only


def pool_mixer(x: jax.Array) -> jax.Array:
    """PoolFormer's mixer: 3x3 average (stride 1, padding not counted) minus the input."""
    h, w = x.shape[1:3]
    # A concrete (numpy) zero: JAX differentiates only reduce_windows it recognises as sums.
    total = jax.lax.reduce_window(x, np.array(0, x.dtype), jax.lax.add, (1, 3, 3, 1),
                                  (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
    counts = np.outer(_pool_counts(h), _pool_counts(w))[None, :, :, None]
    return total / jnp.asarray(counts, x.dtype) - x


class StarReLU(nn.Module):
    """`scale * relu(x)**2 + bias` with learnable scalars (init 1 and 0)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        param = lambda name, init: self.param(
            name, nn.with_logical_partitioning(init, ("scalar",)), (1,), self.param_dtype)
        scale = param("scale", nn.initializers.ones).astype(self.dtype)
        bias = param("bias", nn.initializers.zeros).astype(self.dtype)
        return scale * jnp.square(nn.relu(x)) + bias


def _shifted_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The k*k shifted, channel-scaled copies of zero-padded `x`, summed (one fused loop)."""
    k, pad = kernel.shape[0], kernel.shape[0] // 2
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return sum(padded[:, i:i + h, j:j + w] * kernel[i, j, 0] for i in range(k) for j in range(k))


@jax.custom_vjp
def _depthwise_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _shifted_sum(x, kernel)


def _depthwise_cpu_fwd(x, kernel):
    return _shifted_sum(x, kernel), (x, kernel)


def _depthwise_cpu_bwd(residuals, g):
    x, kernel = residuals
    k, pad = kernel.shape[0], kernel.shape[0] // 2
    h, w = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(jnp.float32)
    g32 = g.astype(jnp.float32)
    # The k*k kernel-gradient sums as one variadic reduce: one pass over x and g instead
    # of k*k (autodiff's separate reductions are ~6x slower on XLA:CPU), then over width.
    products = tuple(padded[:, i:i + h, j:j + w] * g32 for i in range(k) for j in range(k))
    sums = jax.lax.reduce(products, (np.float32(0),) * len(products),
                          lambda a, b: tuple(u + v for u, v in zip(a, b)), (0, 1))
    dkernel = jnp.stack(sums).sum(axis=1).reshape(kernel.shape)
    return _shifted_sum(g, kernel[::-1, ::-1]), dkernel.astype(kernel.dtype)


_depthwise_cpu.defvjp(_depthwise_cpu_fwd, _depthwise_cpu_bwd)


def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise conv, stride 1, 'same' zero padding; kernel [k, k, 1, C] (odd k).

    On CPU a sum of k*k shifted, channel-scaled copies with a hand-written gradient
    (XLA:CPU's grouped convolution is 2-4x slower here, see docs/families.md); elsewhere
    the grouped conv, which maps to the vendor's depthwise kernels.
    """
    if jax.default_backend() == "cpu":
        return _depthwise_cpu(x, kernel)
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), [(pad, pad)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1])


class DepthwiseConv(nn.Module):
    """A bias-free depthwise conv whose kernel [k, k, 1, C] is one parameter, 'kernel'."""

    kernel_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", nn.with_logical_partitioning(
            _INIT, ("kernel", "kernel", "scalar", "mlp")), (k, k, 1, x.shape[-1]), self.param_dtype)
        return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype))


class SepConv(nn.Module):
    """Inverted separable conv: pw (2x) -> StarReLU -> depthwise 7x7 -> pw, no biases."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        y = dense(2 * dim, ("embed", "mlp"), use_bias=False, kernel_init=_INIT,
                  name="pwconv1", **kw)(x)
        y = StarReLU(**kw, name="act1")(y)
        y = DepthwiseConv(7, **kw, name="dwconv")(y)
        return dense(dim, ("mlp", "embed"), use_bias=False, kernel_init=_INIT,
                     name="pwconv2", **kw)(y)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W tokens, head dim 32, no biases."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False,
                  kernel_init=_INIT)
        b, h, w, c = x.shape
        heads = max(c // ATTENTION_HEAD_DIM, 1)
        qkv = dense(3 * heads * ATTENTION_HEAD_DIM, ("embed", "heads"), name="qkv", **kw)(
            x.reshape(b, h * w, c))
        q, k, v = jnp.moveaxis(qkv.reshape(b, h * w, 3, heads, ATTENTION_HEAD_DIM), 2, 0)
        y = jax.nn.dot_product_attention(q, k, v)  # scale 1/sqrt(head dim), softmax in f32
        y = dense(c, ("heads", "embed"), name="proj", **kw)(y.reshape(b, h * w, -1))
        return y.reshape(b, h, w, c)


class RandomMixing(nn.Module):
    """RandFormer's mixer: tokens <- M @ tokens, M a frozen row-softmax of uniform noise."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        draw = lambda: jax.nn.softmax(
            jax.random.uniform(self.make_rng("params"), (h * w, h * w)), axis=-1)
        if not self.is_initializing() and not self.has_variable(FROZEN, "random_matrix"):
            raise ValueError(
                f"RandFormer's frozen mixing matrices are missing: apply the model with "
                f"{{'params': ..., '{FROZEN}': ...}} (both come from `model.init`).")
        matrix = self.variable(FROZEN, "random_matrix", draw).value
        if matrix.shape[0] != h * w:
            raise ValueError(
                f"RandFormer's frozen mixing matrix at {'/'.join(self.path)} mixes "
                f"{matrix.shape[0]} tokens, fixed by the image size the model was "
                f"initialised with (224x224 for the published models); these images give "
                f"{h}x{w} = {h * w} tokens there. Feed images of the initialisation size, or "
                "initialise a new model at this size (it draws new random matrices).")
        y = jnp.einsum("mn,bnc->bmc", matrix.astype(self.dtype), x.reshape(b, h * w, c))
        return y.reshape(b, h, w, c)


class MetaFormerBlock(nn.Module):
    """norm -> token mixer -> (layer scale) residual; norm -> MLP (4x) -> residual."""

    mixer: str
    norm: str
    norm_bias: bool
    norm_eps: float
    mlp_act: str
    mlp_bias: bool
    layer_scale_init: float | None
    res_scale_init: float | None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _scale(self, name, init, x):
        if init is None:
            return x
        s = self.param(name, nn.with_logical_partitioning(nn.initializers.constant(init),
                                                          ("embed",)),
                       (x.shape[-1],), self.param_dtype)
        return x * s.astype(self.dtype)

    def _residual(self, i, x, y, drop_rate, train):
        if train and drop_rate > 0:
            y = drop_path(y, drop_rate, self.make_rng("dropout"))
        return (self._scale(f"res_scale{i}", self.res_scale_init, x)
                + self._scale(f"layer_scale{i}", self.layer_scale_init, y))

    @nn.compact
    def __call__(self, x, drop_rate: float = 0.0, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(_norm, self.norm, use_bias=self.norm_bias, eps=self.norm_eps,
                                 **kw)
        y = norm(name="norm1")(x)
        if self.mixer == "pooling":
            y = pool_mixer(y)
        elif self.mixer == "sepconv":
            y = SepConv(**kw, name="token_mixer")(y)
        elif self.mixer == "attention":
            y = Attention(**kw, name="token_mixer")(y)
        elif self.mixer == "random":
            y = RandomMixing(self.dtype, name="token_mixer")(y)
        x = self._residual(1, x, y, drop_rate, train)

        y = norm(name="norm2")(x)
        dense_kw = dict(use_bias=self.mlp_bias, kernel_init=_INIT, **kw)
        y = dense(4 * x.shape[-1], ("embed", "mlp"), name="fc1", **dense_kw)(y)
        y = (StarReLU(**kw, name="act")(y) if self.mlp_act == "starrelu"
             else nn.gelu(y, approximate=False))
        y = dense(x.shape[-1], ("mlp", "embed"), name="fc2", **dense_kw)(y)
        return self._residual(2, x, y, drop_rate, train)


def feature_sizes(stem: Sequence[int], dims: Sequence[int], size: int) -> list[int]:
    """One side of each stage's feature map for an image side `size` (PyTorch rounding).

    A stage halves the map only where its width changes (as timm, which downsamples only
    then)."""
    kernel, stride, padding = stem
    sizes = [(size + 2 * padding - kernel) // stride + 1]
    for previous, dim in zip(dims, dims[1:]):
        sizes.append(sizes[-1] if dim == previous else (sizes[-1] + 2 - 3) // 2 + 1)
    return sizes


class MetaFormer(nn.Module):
    """A staged MetaFormer. Input: images [batch, height, width, 3], ImageNet-normalised.

    Returns logits [batch, num_classes], or the pooled, normalised features [batch,
    dims[-1]] when `num_classes` is None. With `return_intermediates=True` returns
    `(output, feats)` from the same pass: 'stem' and 'stage_{i}' (NHWC feature maps, the
    shapes timm's `forward_intermediates` gives) and 'pre_logits'.
    """

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    token_mixers: tuple[str, ...]              # per stage, from MIXERS
    norm: str = "layer"                         # 'layer' (channels) or 'group' (1 group)
    norm_bias: bool = False
    norm_eps: float = 1e-6
    downsample_norm: bool = True                # a norm after the stem and before downsampling
    mlp_act: str = "starrelu"                   # or 'gelu' (exact)
    mlp_bias: bool = False
    layer_scale_init: float | None = None
    res_scale_init: tuple[float | None, ...] = (None, None, 1.0, 1.0)
    mlp_head: bool = True                       # ConvFormer/CAFormer's MLP head, else Linear
    stem: tuple[int, int, int] = (7, 4, 2)      # stem conv kernel, stride, padding
    num_classes: int | None = 1000
    dropout: float = 0.0
    head_dropout: float = 0.0
    stoch_depth: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    def drop_rates(self) -> list[np.ndarray]:
        """Per-stage drop-path rates: linear from 0 to `stoch_depth` over all blocks."""
        rates = np.linspace(0.0, self.stoch_depth, sum(self.depths), dtype=np.float32)
        return np.split(rates, np.cumsum(self.depths)[:-1])

    def _check(self, height: int, width: int):
        n = len(self.depths)
        if not (len(self.dims) == len(self.token_mixers) == len(self.res_scale_init) == n):
            raise ValueError(f"depths, dims, token_mixers and res_scale_init need one entry "
                             f"per stage; got {self.depths}, {self.dims}, "
                             f"{self.token_mixers}, {self.res_scale_init}.")
        unknown = set(self.token_mixers) - set(MIXERS)
        if unknown:
            raise ValueError(f"Unknown token mixer(s) {sorted(unknown)}; known: {MIXERS}.")
        if min(feature_sizes(self.stem, self.dims, min(height, width))) < 1:
            raise ValueError(
                f"Image size {height}x{width} is too small for this model's stem (kernel, "
                f"stride, padding) = {tuple(self.stem)}: feed images of at least "
                f"{self.stem[0] - 2 * self.stem[2]} pixels a side.")

    @nn.compact
    def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
        self._check(*images.shape[1:3])
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channel_norm = functools.partial(_norm, "layer", use_bias=False, eps=1e-6, **kw)
        kernel, stride, padding = self.stem
        x = _conv(self.dims[0], kernel, ("kernel", "kernel", "channels", "embed"),
                  stride=stride, padding=padding, name="stem_conv", **kw)(images)
        if self.downsample_norm:
            x = channel_norm(name="stem_norm")(x)
        feats = {"stem": x}

        block_cls = nn.remat(MetaFormerBlock, static_argnums=(2, 3)) if self.remat \
            else MetaFormerBlock
        rates = self.drop_rates()
        for i, depth in enumerate(self.depths):
            if x.shape[-1] != self.dims[i]:
                if self.downsample_norm:
                    x = channel_norm(name=f"stages_{i}_downsample_norm")(x)
                x = _conv(self.dims[i], 3, ("kernel", "kernel", "embed", "embed"), stride=2,
                          padding=1, name=f"stages_{i}_downsample_conv", **kw)(x)
            for j in range(depth):
                x = block_cls(
                    self.token_mixers[i], self.norm, self.norm_bias, self.norm_eps,
                    self.mlp_act, self.mlp_bias, self.layer_scale_init,
                    self.res_scale_init[i], **kw, name=f"stages_{i}_blocks_{j}",
                )(x, float(rates[i][j]), train)
            feats[f"stage_{i}"] = x

        x = layer_norm(name="pre_head_norm", **kw)(jnp.mean(x, axis=(1, 2)))
        feats["pre_logits"] = x
        if self.num_classes is not None:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
            if self.mlp_head:
                hidden = 4 * x.shape[-1]
                x = dense(hidden, ("embed", "mlp"), kernel_init=_INIT, name="mlp_head_fc1",
                          **kw)(x)
                x = layer_norm("mlp", name="mlp_head_norm", **kw)(jnp.square(nn.relu(x)))
                x = nn.Dropout(self.head_dropout, deterministic=not train)(x)
            x = dense(self.num_classes, ("mlp" if self.mlp_head else "embed", "classes"),
                      kernel_init=_INIT, name="head", **kw)(x)
        return (x, feats) if return_intermediates else x


# ---------------------------------------------------------------------------------------
# Variants (names and settings as timm's `timm/models/metaformer.py` and the official code).

_SIZES = {  # size -> (depths, dims)
    "s12": ((2, 2, 6, 2), (64, 128, 320, 512)),
    "s18": ((3, 3, 9, 3), (64, 128, 320, 512)),
    "s24": ((4, 4, 12, 4), (64, 128, 320, 512)),
    "s36": ((6, 6, 18, 6), (64, 128, 320, 512)),
    "m36": ((6, 6, 18, 6), (96, 192, 384, 768)),
    "m48": ((8, 8, 24, 8), (96, 192, 384, 768)),
}
_CONV_SIZES = {  # ConvFormer / CAFormer
    "s18": ((3, 3, 9, 3), (64, 128, 320, 512)),
    "s36": ((3, 12, 18, 3), (64, 128, 320, 512)),
    "m36": ((3, 12, 18, 3), (96, 192, 384, 576)),
    "b36": ((3, 12, 18, 3), (128, 256, 512, 768)),
}
_POOL_SIZES = ("s12", "s24", "s36", "m36", "m48")
_V2 = dict(norm="group", mlp_head=False)  # PoolFormer v2, IdentityFormer, RandFormer
# family -> (fields shared by its variants, sizes)
_LINES = {
    "poolformer": (dict(token_mixers=("pooling",) * 4, norm="group", norm_bias=True,
                        norm_eps=1e-5, downsample_norm=False, mlp_act="gelu", mlp_bias=True,
                        res_scale_init=(None,) * 4, mlp_head=False),
                   {s: _SIZES[s] for s in _POOL_SIZES}),
    "poolformerv2": (dict(token_mixers=("pooling",) * 4, **_V2),
                     {s: _SIZES[s] for s in _POOL_SIZES}),
    "convformer": (dict(token_mixers=("sepconv",) * 4), _CONV_SIZES),
    "caformer": (dict(token_mixers=("sepconv",) * 2 + ("attention",) * 2), _CONV_SIZES),
    "identityformer": (dict(token_mixers=("identity",) * 4, **_V2),
                       {s: _SIZES[s] for s in _POOL_SIZES}),
    "randformer": (dict(token_mixers=("identity",) * 2 + ("random",) * 2, **_V2),
                   {s: _SIZES[s] for s in _POOL_SIZES}),
}
TIMM_LINES = ("poolformer", "poolformerv2", "convformer", "caformer")


def _variant(line: str, size: str) -> dict:
    shared, sizes = _LINES[line]
    depths, dims = sizes[size]
    fields = dict(shared, depths=depths, dims=dims)
    if line == "poolformer":  # timm: 1e-5 for s12/s24, 1e-6 for the deeper ones
        fields["layer_scale_init"] = 1e-5 if size in ("s12", "s24") else 1e-6
    return fields


VARIANTS = {f"{line}_{size}": _variant(line, size)
            for line, (_, sizes) in _LINES.items() for size in sizes}


def _blocks(flat) -> dict[int, dict[int, set[str]]]:
    """stage -> block -> the block's parameter names ('fc1/kernel', ...)."""
    out: dict[int, dict[int, set[str]]] = {}
    for key in flat:
        m = re.match(r"stages_(\d+)_blocks_(\d+)/(.*)$", key)
        if m:
            out.setdefault(int(m[1]), {}).setdefault(int(m[2]), set()).add(m[3])
    return out


def _architecture(line: str, flat) -> dict:
    """The `MetaFormer` fields of a `line` ("caformer", ...) tree, from its shapes."""
    base = _variant(line, next(iter(_LINES[line][1])))
    blocks = _blocks(flat)
    if "stem_conv/kernel" not in flat or sorted(blocks) != list(range(len(blocks))) or any(
            sorted(b) != list(range(len(b))) for b in blocks.values()):
        raise ValueError(f"Not a {line} parameter tree: expected 'stem_conv/kernel' and "
                         "'stages_{i}_blocks_{j}/...' keys numbered from 0.")
    mixers = []
    for i in sorted(blocks):
        names = blocks[i][0]
        found = ("attention" if "token_mixer/qkv/kernel" in names else
                 "sepconv" if "token_mixer/pwconv1/kernel" in names else
                 "random" if "token_mixer/" + keys.RANDOM_MATRIX in names else None)
        default = base["token_mixers"][min(i, len(base["token_mixers"]) - 1)]
        if found != default and (found is not None or default in ("sepconv", "attention",
                                                                   "random")):
            # RandFormer's matrices are constants: its parameters alone look like IdentityFormer's.
            raise ValueError(f"Not a {line} parameter tree: stage {i} has a "
                             f"{found or 'parameter-free'} token mixer, {line} a {default} one"
                             + (" (RandFormer's frozen matrices, constants besides the "
                                "parameters, are missing)" if default == "random" else "") + ".")
        mixers.append(default)
    first = {i: blocks[i][0] for i in blocks}
    kernel = flat["stem_conv/kernel"].shape[0]
    depths = tuple(len(blocks[i]) for i in sorted(blocks))
    dims = tuple(int(flat[f"stages_{i}_blocks_0/norm1/scale"].shape[0]) for i in sorted(blocks))
    # A published size's own init values (PoolFormer v1's layer scale) where the shapes match.
    base = next((v for n, v in VARIANTS.items() if n.rsplit("_", 1)[0] == line
                 and (v["depths"], v["dims"]) == (depths, dims)), base)
    return dict(
        base,
        depths=depths,
        dims=dims,
        token_mixers=tuple(mixers),
        norm_bias="norm1/bias" in first[0],
        downsample_norm="stem_norm/scale" in flat,
        mlp_bias="fc1/bias" in first[0],
        layer_scale_init=base["layer_scale_init"] if "layer_scale1" in first[0] else None,
        res_scale_init=tuple(1.0 if "res_scale1" in first[i] else None for i in sorted(blocks)),
        mlp_head="mlp_head_fc1/kernel" in flat,
        # Stride and padding are not in the weights: timm's 7x7/4 stem, or (an override for
        # small images) stride 1 with 'same' padding.
        stem=(7, 4, 2) if kernel == 7 else (kernel, 1, kernel // 2),
    )


def _flat(tree, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, Mapping) else {prefix + k: v})
    return out


def _nest(flat) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *path, leaf = key.split("/")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _expected(line: str, flat) -> dict:
    """Flat abstract shapes of the `line` model that `flat` describes (params and frozen)."""
    num_classes = flat["head/kernel"].shape[1] if "head/kernel" in flat else None
    model = MetaFormer(**_architecture(line, flat), num_classes=num_classes)
    init = lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    variables = nn.meta.unbox(jax.eval_shape(init))
    return {**_flat(variables["params"]), **_flat(variables.get(FROZEN, {}))}


def _check_keys(line: str, flat, show=repr) -> None:
    """Raises ValueError naming (by `show(key)`) the first missing, mis-shaped or unknown key."""
    expected = _expected(line, flat)
    for key in sorted(expected):
        if key not in flat:
            raise ValueError(f"The {line} weights lack {show(key)}.")
        # A RandFormer matrix's size follows the image size at init, not the architecture.
        if not key.endswith(keys.RANDOM_MATRIX) and \
                tuple(flat[key].shape) != tuple(expected[key].shape):
            raise ValueError(f"{show(key)} has shape {tuple(flat[key].shape)}, the {line} "
                             f"model it describes expects {tuple(expected[key].shape)}.")
    unknown = sorted(set(flat) - set(expected))
    if unknown:
        raise ValueError(f"Unknown {line} parameter {show(unknown[0])}.")


def _from_timm(line: str, state_dict) -> dict:
    flat = keys.timm_to_flat(state_dict)
    _check_keys(line, flat)
    return flat


def _to_timm(line: str, flat) -> dict:
    _check_keys(line, flat)
    return keys.flat_to_timm(flat)


def from_official(state_dict) -> dict:
    """An official sail-sg/metaformer state dict (`identityformer_s12.pth`, ...) -> variables.

    Returns `{"params": tree}`, plus `{"frozen": tree}` holding RandFormer's mixing
    matrices; the line (IdentityFormer or RandFormer) is read from the keys. Values may be
    numpy arrays or torch tensors (converted on CPU).
    """
    sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
          for k, v in state_dict.items()}
    line = official_line(sd)
    if line is None:
        raise ValueError(f"Not the official MetaFormer layout (keys 'downsample_layers.*', "
                         f"'stages.<i>.<j>.*'): found e.g. {sorted(sd)[:3]}.")
    renamed = keys.official_to_timm_names(sd)  # the same order
    unknown = next((k for k, name in zip(sd, renamed) if keys.flat_name(name) is None), None)
    if unknown is not None:
        raise ValueError(f"Unknown key {unknown!r}: not one of the official IdentityFormer/"
                         "RandFormer layout.")
    flat = keys.timm_to_flat(renamed)
    _check_keys(line, flat, show=lambda key: repr(next(iter(keys.timm_to_official_names(
        keys.flat_to_timm({key: np.float32(0)}, pointwise_convs=False))))))
    frozen = {k: v for k, v in flat.items() if k.endswith(keys.RANDOM_MATRIX)}
    params = {k: v for k, v in flat.items() if k not in frozen}
    return {"params": _nest(params), **({FROZEN: _nest(frozen)} if frozen else {})}


def to_official(variables) -> dict:
    """Our variables (`{"params": ..., "frozen": ...}`) -> the official state dict layout."""
    flat = {k: np.asarray(v) for col in ("params", FROZEN)
            for k, v in _flat(variables.get(col, {})).items()}
    return keys.timm_to_official_names(keys.flat_to_timm(flat, pointwise_convs=False))


def official_line(state_dict) -> str | None:
    """'randformer' or 'identityformer' for a state dict in the official layout (its keys:
    `downsample_layers.*`, `stages.{i}.{j}.*`), None for any other layout. The other official
    lines (PoolFormer v2, ConvFormer, CAFormer) share the layout; `from_official` refuses them."""
    names = list(state_dict)
    if not any(k.startswith("downsample_layers.") for k in names) or \
            not any(re.match(r"stages\.\d+\.\d+\.", k) for k in names):
        return None
    return "randformer" if any(k.endswith(keys.RANDOM_MATRIX) for k in names) \
        else "identityformer"


def init_image_size(variables) -> int:
    """The square image side a model's variables were made for: the one whose token count
    RandFormer's frozen matrices fix (224 for the published models), else 224."""
    frozen = _flat(variables.get(FROZEN, {}))
    if not frozen:
        return 224
    key = min(frozen)
    stage, tokens = int(re.match(r"stages_(\d+)_", key)[1]), frozen[key].shape[0]
    fields = _architecture("randformer", {**_flat(variables["params"]), **frozen})
    side = math.isqrt(tokens)
    dims = fields["dims"]
    halvings = sum(a != b for a, b in zip(dims[:stage], dims[1:stage + 1]))
    size = side * fields["stem"][1] * 2 ** halvings
    if feature_sizes(fields["stem"], dims, size)[stage] ** 2 != tokens:
        raise ValueError(f"{key!r} mixes {tokens} tokens, not a square map of a stage "
                         f"{stage} of this RandFormer: the weights are inconsistent.")
    return size


def flops(model: MetaFormer, image_size: tuple[int, int]) -> dict[str, int]:
    """Analytic forward FLOPs of one image (2 x multiply-adds), by component.

    Counted: stem and downsampling convs, the token mixers' convs and matmuls (pooling and
    identity: none; attention: q/k/v, both attention matmuls, projection; random mixing:
    the N x N matmul), the MLPs and the head. Norms, activations, pooling adds and the
    softmax are left out (a few percent).
    """
    heights = feature_sizes(model.stem, model.dims, image_size[0])
    widths = feature_sizes(model.stem, model.dims, image_size[1])
    kernel = model.stem[0]
    terms = {"stem": 2 * heights[0] * widths[0] * kernel * kernel * 3 * model.dims[0],
             "downsample": 0, "token_mixer": 0, "mlp": 0}
    for i, (depth, dim, mixer) in enumerate(zip(model.depths, model.dims, model.token_mixers)):
        n = heights[i] * widths[i]
        if i and model.dims[i - 1] != dim:
            terms["downsample"] += 2 * n * 9 * model.dims[i - 1] * dim
        attn = max(dim // ATTENTION_HEAD_DIM, 1) * ATTENTION_HEAD_DIM
        per_block = {"sepconv": 2 * n * (2 * dim * dim * 2 + 49 * 2 * dim),
                     "attention": 2 * n * (4 * dim * attn + 2 * n * attn),
                     "random": 2 * n * n * dim}.get(mixer, 0)
        terms["token_mixer"] += depth * per_block
        terms["mlp"] += depth * 2 * n * 2 * 4 * dim * dim
    width, classes = model.dims[-1], model.num_classes or 0
    terms["head"] = (2 * (width * 4 * width + 4 * width * classes) if model.mlp_head and classes
                     else 2 * width * classes)
    return terms


def _register(line: str) -> registry.Family:
    timm = line in TIMM_LINES
    variants = {n: v for n, v in VARIANTS.items() if n.rsplit("_", 1)[0] == line}
    return registry.register(registry.Family(
        name=line, module=MetaFormer, variants=variants,
        timm_names={n: n for n in variants} if timm else {},
        architecture=functools.partial(_architecture, line),
        from_timm=functools.partial(_from_timm, line) if timm else None,
        to_timm=functools.partial(_to_timm, line) if timm else None,
        # timm's crop: 0.9 for PoolFormer v1 (0.95 for its M sizes' weights), else 1.0.
        preprocessing=dataclasses.replace(registry.IMAGENET,
                                          crop_pct=0.9 if line == "poolformer" else 1.0),
        flops=flops,
        # one block per stage, a 3x3 stride-1 stem: a fast model for 16x16 test inputs
        tiny=dict(dims=(32, 32, 64, 64), depths=(1, 1, 1, 1), stem=(3, 1, 1)),
    ))


FAMILIES = {line: _register(line) for line in _LINES}
