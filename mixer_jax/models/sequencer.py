"""Sequencer2D (Tatsunami & Taki 2022, "Sequencer: Deep LSTM for Image Classification").

Matches `timm.models.sequencer` (sequencer2d_s/m/l) in architecture, numerics and,
through `from_timm`/`to_timm`, in key names:

- stem: a 7x7 stride-7 patch conv (timm's `PatchEmbed`, no norm), NHWC from then on;
- four stages; stages 1-3 start with timm's `Downsample2d`, a conv with kernel = stride =
  the stage's patch size (2, 1, 1: the 1x1 "downsamplings" only change nothing but the
  channels' mixing, exactly as timm has them);
- a block: x + LSTM2d(LN(x)); x + MLP(LN(x)) with LayerNorm eps 1e-6, an MLP of ratio 3
  with exact (erf) GELU, and LSTM2d = a bidirectional LSTM along every column (top to
  bottom and back) and one along every row (left to right and back), their four outputs
  concatenated [columns fwd, columns bwd, rows fwd, rows bwd] and fused by a Linear
  4*hidden -> channels;
- a final LayerNorm, global average pooling, the classifier `head`.

The LSTM is PyTorch's `nn.LSTM` (gate order i, f, g, o; the two biases bias_ih and bias_hh
kept apart so weights round-trip bitwise; zero initial state) written with `lax.scan`.
How it runs (measured in docs/families.md, "Sequencer2D"): the input projections of all
time steps, both directions, rows and columns, are one matmul hoisted out of the
recurrence; the recurrence then runs every direction in one scan (rows and columns
together when the map is square, else one scan each), their recurrent matmuls as one
matmul batched over the directions per step.

Regularisation (both identity at eval):
- `dropout`: timm's `proj_drop_rate`, after the GELU and after the second Linear of every
  MLP.
- `stoch_depth`: timm's `drop_path_rate`. timm gives *every* block this same rate (its
  stages receive the float, not a per-block schedule), so we do too: drop-path per
  example on both residual branches of every block, kept branches scaled by 1/(1-p).

Input sizes: like timm, any image the stem and downsamplings leave non-empty; a size that
is not a multiple of the stride drops the trailing pixels exactly as timm's strided convs
do (e.g. 256 -> a 36x36 stem map). The LSTMs have no fixed token count.

Parameter axes: the LSTM weights' gate axis (4*hidden) is NOT split over the 'model' mesh
axis. Each step's cell update needs all four gates of a hidden unit, and the recurrent
matmul h_{t-1} @ W_hh needs the whole of h_{t-1}: a Megatron split would put an
all-gather inside every one of the H (or W) sequential steps, latency the recurrence
cannot hide. So the LSTM and its fusing Linear are "embed" axes (FSDP may shard them;
they are gathered once, outside the scan); only the channel MLP's hidden width is "mlp".
"""
from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from mixer_jax.models import registry
from mixer_jax.models.layers import Mlp, dense, layer_norm, residual

Dtype = Any

# name -> (layers, patch_sizes, embed_dims, hidden_sizes); mlp ratio 3 everywhere.
_VARIANT_TABLE = {
    "sequencer2d_s": ((4, 3, 8, 3), (7, 2, 1, 1), (192, 384, 384, 384), (48, 96, 96, 96)),
    "sequencer2d_m": ((4, 3, 14, 3), (7, 2, 1, 1), (192, 384, 384, 384), (48, 96, 96, 96)),
    "sequencer2d_l": ((8, 8, 16, 4), (7, 2, 1, 1), (192, 384, 384, 384), (48, 96, 96, 96)),
}
VARIANTS = {
    name: dict(layers=layers, patch_sizes=patches, embed_dims=dims, hidden_sizes=hidden,
               mlp_ratios=(3.0,) * 4)
    for name, (layers, patches, dims, hidden) in _VARIANT_TABLE.items()
}

# The LSTMs of one block, in the order their outputs are concatenated before `fc`.
_RNNS = ("rnn_v", "rnn_h")          # along columns (vertical), along rows (horizontal)
_DIRECTIONS = ("l0", "l0_reverse")  # torch's suffixes of a one-layer bidirectional LSTM


def _lstm_cell(carry, gates_x, w_hh):
    """One step of D independent LSTMs: torch's gates (i, f, g, o) and cell update.

    carry: h [N, D, H] (compute dtype), c [N, D, H] (float32, so a long sequence in bf16
    does not drift); gates_x [N, D, 4H] = x_t W_ih + b_ih + b_hh; w_hh [D, H, 4H].
    """
    h, c = carry
    gates = (gates_x + jnp.einsum("ndh,dhk->ndk", h, w_hh)).astype(jnp.float32)
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = (jax.nn.sigmoid(o) * jnp.tanh(c)).astype(h.dtype)
    return (h, c), h


def lstm_scan(gates_x: jax.Array, w_hh: jax.Array, *, unroll: int | bool = 1) -> jax.Array:
    """Runs D LSTMs over time in one `lax.scan`; odd-numbered ones run backwards in time.

    gates_x: [T, N, D, 4H] input projections x_t W_ih + b_ih + b_hh (time-major, in input
    order, directions alternating forward, reverse as a bidirectional torch LSTM's);
    w_hh: [D, H, 4H]. Returns the hidden states [T, N, D, H], in input order.

    The D recurrent matmuls of a step are one matmul batched over D (docs/families.md
    compares it with a block-diagonal matmul and with D separate ones).
    """
    _, n, d, _ = gates_x.shape
    hidden = w_hh.shape[1]
    reverse = (jnp.arange(d) % 2 == 1)[None, None, :, None]
    flip = lambda t: jnp.where(reverse, t[::-1], t)
    carry = (jnp.zeros((n, d, hidden), gates_x.dtype), jnp.zeros((n, d, hidden), jnp.float32))
    step = lambda carry, g: _lstm_cell(carry, g, w_hh)
    return flip(jax.lax.scan(step, carry, flip(gates_x), unroll=unroll)[1])


class BiLstmParams(nn.Module):
    """The parameters of one bidirectional torch `nn.LSTM` layer (torch's names, kernels
    transposed), as [forward, reverse] dicts; the computation is `LSTM2d`'s."""

    hidden_size: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, channels: int) -> list[dict[str, jax.Array]]:
        hid = self.hidden_size
        bound = 1.0 / np.sqrt(hid)  # torch's (and timm's) LSTM init
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
        shapes = dict(kernel_ih=(channels, 4 * hid), kernel_hh=(hid, 4 * hid),
                      bias_ih=(4 * hid,), bias_hh=(4 * hid,))
        # The gate axis stays unsplit over 'model' (module docstring): "embed" axes only.
        return [{k: self.param(f"{k}_{d}", nn.with_logical_partitioning(init, ("embed",) * len(shape)),
                               shape, self.param_dtype)
                 for k, shape in shapes.items()}
                for d in _DIRECTIONS]


class LSTM2d(nn.Module):
    """timm's `LSTM2d` (union "cat", with fc): bidirectional LSTMs along columns and rows.

    Parameters per LSTM (`rnn_v`, `rnn_h`) and direction (`l0`, `l0_reverse`), named as
    torch's `nn.LSTM` with kernels transposed: kernel_ih [C, 4H], kernel_hh [H, 4H],
    bias_ih [4H], bias_hh [4H].
    """

    hidden_size: int
    unroll: int | bool = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, height, width, channels = x.shape
        params = [p for rnn in _RNNS
                  for p in BiLstmParams(self.hidden_size, self.param_dtype, name=rnn)(channels)]
        stack = lambda k: jnp.stack([p[k] for p in params]).astype(self.dtype)
        w_ih, w_hh = stack("kernel_ih"), stack("kernel_hh")
        bias = stack("bias_ih") + stack("bias_hh")
        # Every time step's input projection, all four LSTMs: one matmul out of the scan.
        gx = jnp.einsum("bhwc,dck->bhwdk", x.astype(self.dtype), w_ih) + bias
        # Columns run along the height (sequences: b, w); rows along the width (b, h).
        cols = jnp.transpose(gx[..., :2, :], (1, 0, 2, 3, 4)).reshape(height, b * width, 2, -1)
        rows = jnp.transpose(gx[..., 2:, :], (2, 0, 1, 3, 4)).reshape(width, b * height, 2, -1)
        run = functools.partial(lstm_scan, unroll=self.unroll)
        if height == width:  # one scan for all four
            out = run(jnp.concatenate([cols, rows], axis=2), w_hh)
            v, h = out[:, :, :2], out[:, :, 2:]
        else:
            v, h = run(cols, w_hh[:2]), run(rows, w_hh[2:])
        hid = self.hidden_size
        v = jnp.transpose(v.reshape(height, b, width, 2, hid), (1, 0, 2, 3, 4))
        h = jnp.transpose(h.reshape(width, b, height, 2, hid), (1, 2, 0, 3, 4))
        y = jnp.concatenate([v, h], axis=3).reshape(b, height, width, 4 * hid)
        return dense(channels, ("embed", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.initializers.xavier_uniform(), name="fc")(y)


class Sequencer2dBlock(nn.Module):
    """x + LSTM2d(LN(x)); x + MLP(LN(x)) on NHWC maps."""

    hidden_size: int
    mlp_ratio: float = 3.0
    dropout: float = 0.0
    unroll: int | bool = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, drop_rate: float = 0.0, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        channels = x.shape[-1]
        y = layer_norm(name="norm1", **kw)(x)
        y = LSTM2d(self.hidden_size, self.unroll, name="rnn_tokens", **kw)(y)
        x = residual(self, x, y, drop_rate, train)
        y = layer_norm(name="norm2", **kw)(x)
        y = Mlp(int(self.mlp_ratio * channels), dropout=self.dropout, name="mlp_channels",
                **kw)(y, train=train)
        return residual(self, x, y, drop_rate, train)


class Sequencer2dStage(nn.Module):
    """timm's `Sequencer2dStage`: an optional `downsample` conv, then `blocks_{j}`."""

    depth: int
    dim: int
    patch_size: int | None  # None: no downsampling (the first stage)
    hidden_size: int
    mlp_ratio: float
    dropout: float = 0.0
    remat: bool = False
    unroll: int | bool = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, drop_rate: float, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.patch_size is not None:
            x = _conv(self.dim, self.patch_size, "embed", name="downsample", **kw)(x)
        block_cls = (nn.remat(Sequencer2dBlock, static_argnums=(2, 3)) if self.remat
                     else Sequencer2dBlock)
        for j in range(self.depth):
            x = block_cls(self.hidden_size, self.mlp_ratio, self.dropout, self.unroll,
                          name=f"blocks_{j}", **kw)(x, drop_rate, train)
        return x


def _conv(features, kernel, in_axis, *, name, dtype, param_dtype):
    """A conv with kernel = stride (timm's PatchEmbed / Downsample2d), lecun-normal init."""
    return nn.Conv(
        features, (kernel, kernel), strides=(kernel, kernel), padding="VALID", name=name,
        dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("kernel", "kernel", in_axis, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def feature_sizes(patch_sizes, height: int, width: int) -> list[tuple[int, int]]:
    """The (h, w) of the stem's and every stage's map for an image (timm's floor division)."""
    sizes, (h, w) = [], (height, width)
    for p in patch_sizes:
        h, w = h // p, w // p
        sizes.append((h, w))
    return sizes


class Sequencer2d(nn.Module):
    """Sequencer2D. Input: images [batch, height, width, 3], ImageNet-normalised.

    Returns logits [batch, num_classes] (pooled features [batch, embed_dims[-1]] when
    `num_classes` is None); with `return_intermediates=True`, `(output, feats)`: 'stem'
    and 'stage_{i}' (NHWC maps, as timm's `forward_intermediates(..., output_fmt='NHWC')`
    gives them: stage outputs before the final norm) and 'pre_logits' (normed, pooled).
    `unroll` is `lax.scan`'s unroll of the LSTM recurrence (speed only).
    """

    layers: tuple[int, ...]
    patch_sizes: tuple[int, ...]
    embed_dims: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    mlp_ratios: tuple[float, ...] = (3.0, 3.0, 3.0, 3.0)
    num_classes: int | None = 1000
    dropout: float = 0.0
    stoch_depth: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    unroll: int | bool = 1

    @nn.compact
    def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
        height, width = images.shape[1:3]
        sizes = feature_sizes(self.patch_sizes, height, width)
        if min(min(s) for s in sizes) < 1:
            stride = int(np.prod(self.patch_sizes))
            raise ValueError(
                f"Image size {height}x{width} is too small for Sequencer2D: its stem and "
                f"downsamplings reduce by {stride}, so each side must be at least {stride} "
                "pixels.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(self.embed_dims[0], self.patch_sizes[0], "channels", name="stem", **kw)(images)
        feats = {"stem": x}
        for i, depth in enumerate(self.layers):
            x = Sequencer2dStage(
                depth, self.embed_dims[i], self.patch_sizes[i] if i > 0 else None,
                self.hidden_sizes[i], self.mlp_ratios[i], self.dropout, self.remat, self.unroll,
                name=f"stages_{i}", **kw)(x, float(self.stoch_depth), train)
            feats[f"stage_{i}"] = x
        x = layer_norm(name="norm", **kw)(x)
        x = jnp.mean(x, axis=(1, 2))
        feats["pre_logits"] = x
        if self.num_classes is not None:
            x = dense(self.num_classes, ("embed", "classes"), kernel_init=nn.initializers.zeros,
                      name="head", **kw)(x)
        return (x, feats) if return_intermediates else x


# ----------------------------------------------------------------------------
# Parameter trees: architecture, timm's state dict, FLOPs.

_STAGE = re.compile(r"^stages_(\d+)/")
_BLOCK = re.compile(r"^stages_(\d+)/blocks_(\d+)/")


def architecture(flat) -> dict:
    """The `Sequencer2d` architecture fields of flat per-block parameters, from their shapes."""
    if "stem/kernel" not in flat:
        raise ValueError("Not a Sequencer2D parameter tree: it has no 'stem/kernel'.")
    stages = sorted({int(m.group(1)) for k in flat if (m := _STAGE.match(k))})
    if stages != list(range(len(stages))) or not stages:
        raise ValueError(f"Not a Sequencer2D parameter tree: stages {stages} are not 0..n-1.")
    layers, patches, dims, hidden, ratios = [], [], [], [], []
    for i in stages:
        blocks = {int(m.group(2)) for k in flat if (m := _BLOCK.match(k)) and int(m.group(1)) == i}
        first = f"stages_{i}/blocks_0"
        try:
            dim = flat[f"{first}/norm1/scale"].shape[0]
            hidden.append(flat[f"{first}/rnn_tokens/rnn_v/kernel_hh_l0"].shape[0])
            ratios.append(flat[f"{first}/mlp_channels/fc1/kernel"].shape[1] / dim)
            patch = flat["stem/kernel" if i == 0 else f"stages_{i}/downsample/kernel"].shape[0]
        except KeyError as e:
            raise ValueError(f"Not a Sequencer2D parameter tree: {e.args[0]!r} is missing.") from None
        layers.append(len(blocks))
        dims.append(dim)
        patches.append(patch)
    return dict(layers=tuple(layers), patch_sizes=tuple(patches), embed_dims=tuple(dims),
                hidden_sizes=tuple(hidden), mlp_ratios=tuple(ratios))


def _expected_shapes(flat) -> dict[str, tuple[int, ...]]:
    """Every flat key (and its shape) of the model whose architecture `flat` has."""
    head = flat.get("head/kernel")
    return _model_shapes(tuple(architecture(flat).items()),
                         None if head is None else head.shape[-1])


@functools.lru_cache(maxsize=16)
def _model_shapes(arch: tuple, num_classes: int | None) -> dict[str, tuple[int, ...]]:
    model = Sequencer2d(**dict(arch), num_classes=num_classes)
    size = int(np.prod(model.patch_sizes))  # the smallest image: shapes don't depend on it
    shapes = registry.param_shapes(model, (size, size, 3))
    return {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(shapes).items()}


def _check(flat: dict, source: dict[str, str]) -> dict:
    """`flat` if its keys and shapes are exactly the model's; else a ValueError naming the
    first offending key (`source` maps our keys to the caller's)."""
    expected = _expected_shapes(flat)
    for k, v in flat.items():
        if k not in expected:
            raise ValueError(f"Unexpected Sequencer2D parameter {source.get(k, k)!r}.")
        if tuple(v.shape) != tuple(expected[k]):
            raise ValueError(f"Sequencer2D parameter {source.get(k, k)!r} has shape "
                             f"{tuple(v.shape)}; this architecture needs {tuple(expected[k])}.")
    missing = [k for k in expected if k not in flat]
    if missing:
        raise ValueError(f"Sequencer2D parameter {missing[0]!r} is missing "
                         f"({len(missing)} missing in all).")
    return flat


# timm module path <-> ours (applied in this order; indices: "stages.1" <-> "stages_1").
_MODULES = (("stem.proj", "stem"), ("head.fc", "head"), ("downsample.down", "downsample"))


def _timm_leaf(name: str, ndim: int) -> str:
    """Our leaf name of a timm leaf ('weight', 'bias', 'weight_ih_l0', ...)."""
    if name == "weight":
        return "scale" if ndim == 1 else "kernel"
    return name.replace("weight_", "kernel_")


def from_timm(state_dict) -> dict:
    """timm's Sequencer2d state dict -> flat params (Linear/LSTM weights transposed,
    convs [out, in, kh, kw] -> [kh, kw, in, out])."""
    flat, source = {}, {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        module, _, leaf = key.rpartition(".")
        for theirs, ours in _MODULES:
            module = module.replace(theirs, ours)
        module = re.sub(r"(stages|blocks)\.(\d+)", r"\1_\2", module).replace(".", "/")
        if value.ndim == 4:
            value = np.transpose(value, (2, 3, 1, 0))
        elif value.ndim == 2:
            value = value.T
        name = f"{module}/{_timm_leaf(leaf, value.ndim)}" if module else leaf
        flat[name], source[name] = value, key
    return _check(flat, source)


def to_timm(flat) -> dict:
    """Flat params -> timm's Sequencer2d state dict (exact inverse of `from_timm`)."""
    _check(dict(flat), {})
    out = {}
    for key, value in flat.items():
        value = np.asarray(value)
        module, _, leaf = key.rpartition("/")
        module = re.sub(r"(stages|blocks)_(\d+)", r"\1.\2", module).replace("/", ".")
        for theirs, ours in _MODULES:
            module = re.sub(rf"(^|\.){ours}($|\.)", rf"\g<1>{theirs}\g<2>", module)
        leaf = "weight" if leaf in ("scale", "kernel") else leaf.replace("kernel_", "weight_")
        if value.ndim == 4:
            value = np.transpose(value, (3, 2, 0, 1))
        elif value.ndim == 2:
            value = value.T
        out[f"{module}.{leaf}"] = value
    return out


def flops(model: Sequencer2d, image_size: tuple[int, int]) -> dict[str, int]:
    """Analytic forward FLOPs of one image (2 x multiply-adds), by component.

    Per block on an h x w map of C channels with LSTM hidden size H: four LSTMs (columns
    and rows, both directions) each cost, per position, an input projection C x 4H and a
    recurrent matmul H x 4H; the fusing fc 4H x C; the MLP 2 x C x rC. The recurrence is
    counted as run: every step, the first (on a zero state) included.
    """
    sizes = feature_sizes(model.patch_sizes, *image_size)
    dims, out = model.embed_dims, dict.fromkeys(
        ("stem", "downsample", "lstm_input", "lstm_recurrent", "lstm_fc", "mlp", "head"), 0)
    (h0, w0), p0 = sizes[0], model.patch_sizes[0]
    out["stem"] = 2 * h0 * w0 * p0 * p0 * 3 * dims[0]
    for i, ((h, w), depth) in enumerate(zip(sizes, model.layers)):
        c, hid, pos = dims[i], model.hidden_sizes[i], h * w
        if i > 0:
            out["downsample"] += 2 * pos * model.patch_sizes[i] ** 2 * dims[i - 1] * c
        out["lstm_input"] += depth * 4 * 2 * pos * c * 4 * hid
        out["lstm_recurrent"] += depth * 4 * 2 * pos * hid * 4 * hid
        out["lstm_fc"] += depth * 2 * pos * 4 * hid * c
        out["mlp"] += depth * 2 * 2 * pos * c * int(model.mlp_ratios[i] * c)
    if model.num_classes is not None:
        out["head"] = 2 * dims[-1] * model.num_classes
    return out


FAMILY = registry.register(registry.Family(
    name="sequencer", module=Sequencer2d, variants=VARIANTS, architecture=architecture,
    from_timm=from_timm, to_timm=to_timm, preprocessing=registry.IMAGENET,
    timm_names={name: name for name in VARIANTS}, flops=flops,
    tiny=dict(layers=(1, 1, 1, 1), patch_sizes=(2, 2, 1, 1), embed_dims=(16, 16, 32, 32),
              hidden_sizes=(8, 8, 16, 16)),
))
