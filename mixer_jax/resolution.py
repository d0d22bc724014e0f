"""Adapting token-mixing parameters to another patch grid (fine-tuning at another resolution).

A parameter axis named "tokens" (`models.registry.AXES`) has one entry per patch,
S = h * w in raster order; a new image size changes S, so pre-trained weights no
longer fit. The functions here act on one array given the role of each of its axes:
"tokens" (a token axis), "hidden" (the hidden width of a token MLP, widened by the
block-diagonal method) or None (left alone). Which parameter plays which role comes
from the logical axes the family declares (see `mixer_jax.finetune`), never from key
names. Two kinds of token mixing are covered:

- a token MLP (MLP-Mixer): `Dense_0: S -> D_S` (kernel [S, D_S] roles ("tokens",
  "hidden"), bias [D_S] ("hidden",)), `Dense_1: D_S -> S` (kernel ("hidden",
  "tokens"), bias ("tokens",));
- a square token map (ResMLP's token linear, gMLP's spatial gating projection):
  kernel [S, S] ("tokens", "tokens"), bias [S] ("tokens",).

Schemes:
- `block_diagonal` (paper, Appendix C) for a grid larger by integer factors
  (kh, kw): the image is split into kh x kw tiles of the pre-training grid, D_S
  is widened to kh*kw*D_S, and every tile gets its own copy of the pre-trained
  weights that only sees that tile's tokens. The model's tokens are in raster order
  over the whole image, so instead of permuting tokens we scatter the kernels'
  rows/columns: token t at (row, col) belongs to tile (row // h, col // w) and
  takes the role of token (row % h, col % w) of that tile; hidden unit j of the
  widened MLP is unit j % D_S of tile j // D_S. Entries that would connect two
  different tiles are zero. Right after this initialisation the token mixing acts on
  every tile as the pre-trained one does on a whole image, so (for Mixer, whose
  other layers act per token) the logits on the large image equal the mean of the
  pre-trained model's logits on its tiles.
- `resample` for any other grid (e.g. 14x14 -> 24x24 for 224 -> 384 pixels, or a
  smaller grid): every token axis is resized over the 2-D patch grid with
  (antialiased) bilinear interpolation, `jax.image.resize(..., "linear")`. A token
  axis that a kernel sums over (any axis but the last of a kernel, e.g. `Dense_0`'s
  [S, D_S] or the input side of a square map) is also scaled by S / S' so the
  pre-activations keep their scale (a spatially constant input gives the same
  hidden activations as before); output token axes (the last axis, biases) are not
  rescaled. Hidden widths are unchanged. On the same grid this is the identity.
"""
from __future__ import annotations

import math

import jax
import numpy as np

Grid = tuple[int, int]


def square_grid(num_tokens: int) -> Grid:
    """The (h, w) patch grid of `num_tokens` tokens, assuming a square image."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"{num_tokens} tokens do not form a square patch grid; pass the grid (h, w) explicitly."
        )
    return side, side


def tile_factors(source_grid: Grid, target_grid: Grid) -> Grid | None:
    """(kh, kw) if `target_grid` is `source_grid` scaled by integer factors, else None."""
    (h, w), (big_h, big_w) = source_grid, target_grid
    if big_h % h or big_w % w or big_h < h or big_w < w:
        return None
    return big_h // h, big_w // w


def _tile_and_position(source_grid: Grid, target_grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """For every target token (raster order): its tile index and its position inside the tile."""
    (h, w), (big_h, big_w) = source_grid, target_grid
    rows, cols = np.divmod(np.arange(big_h * big_w), big_w)
    tile = (rows // h) * (big_w // w) + cols // w
    position = (rows % h) * w + cols % w
    return tile, position


Roles = tuple  # one of "tokens", "hidden", None per axis of an array


def _check_tokens(shape, roles: Roles, source_grid: Grid) -> None:
    if len(roles) != len(shape):
        raise ValueError(f"{len(roles)} axis roles {roles} for an array of shape {shape}.")
    tokens = source_grid[0] * source_grid[1]
    for size, role in zip(shape, roles):
        if role == "tokens" and size != tokens:
            raise ValueError(f"A token axis of size {size} in an array of shape {shape} does "
                             f"not match the {source_grid[0]}x{source_grid[1]} patch grid.")


def adapted_shape(shape, roles: Roles, source_grid: Grid, target_grid: Grid,
                  method: str) -> tuple[int, ...]:
    """The shape `block_diagonal_array` / `resample_array` give an array of `shape`."""
    tokens = target_grid[0] * target_grid[1]
    tiles = 1
    if method == "block_diagonal":
        factors = tile_factors(source_grid, target_grid)
        tiles = factors[0] * factors[1] if factors else 1
    return tuple(tokens if role == "tokens" else size * tiles if role == "hidden" else size
                 for size, role in zip(shape, roles))


def block_diagonal_array(array: np.ndarray, roles: Roles, source_grid: Grid,
                         target_grid: Grid) -> np.ndarray:
    """One array for the larger grid by the paper's method (module docstring)."""
    factors = tile_factors(source_grid, target_grid)
    if factors is None:
        raise ValueError(
            f"Block-diagonal adaptation needs integer grid factors; {source_grid} -> {target_grid} "
            "has none (use resampling)."
        )
    _check_tokens(array.shape, roles, source_grid)
    num_tiles = factors[0] * factors[1]
    tile, position = _tile_and_position(source_grid, target_grid)
    sources, tiles = [], []  # per axis: source index and tile of every target index
    for size, role in zip(array.shape, roles):
        if role == "tokens":
            sources.append(position)
            tiles.append(tile)
        elif role == "hidden":
            sources.append(np.arange(num_tiles * size) % size)
            tiles.append(np.arange(num_tiles * size) // size)
        else:
            sources.append(np.arange(size))
            tiles.append(None)
    out = array[np.ix_(*sources)]
    constrained = [i for i, t in enumerate(tiles) if t is not None]
    if len(constrained) > 1:  # entries between two different tiles are zero
        grids = np.ix_(*[t if t is not None else np.zeros(1, int) for t in tiles])
        same = np.logical_and.reduce([grids[i] == grids[constrained[0]] for i in constrained[1:]])
        out = np.where(same, out, np.zeros((), array.dtype))
    return out.astype(array.dtype, copy=False)


def _resize(maps: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    resized = jax.image.resize(maps.astype(np.float32), shape, "linear", antialias=True)
    return np.asarray(jax.device_get(resized)).astype(maps.dtype)


def resample_array(array: np.ndarray, roles: Roles, source_grid: Grid,
                   target_grid: Grid) -> np.ndarray:
    """One array resized over the 2-D patch grid (module docstring)."""
    _check_tokens(array.shape, roles, source_grid)
    if "tokens" not in roles:
        return array
    (h, w), (big_h, big_w) = source_grid, target_grid
    grid_shape, target_shape, scale = [], [], 1.0
    for axis, (size, role) in enumerate(zip(array.shape, roles)):
        if role == "tokens":
            grid_shape += [h, w]
            target_shape += [big_h, big_w]
            if axis < array.ndim - 1:  # a kernel's input axis: summed over
                scale *= (h * w) / (big_h * big_w)
        else:
            grid_shape.append(size)
            target_shape.append(size)
    out = _resize(array.reshape(grid_shape), tuple(target_shape))
    if scale != 1.0:
        out = out * np.asarray(scale, array.dtype)
    return out.reshape(adapted_shape(array.shape, roles, source_grid, target_grid, "resample"))


# A token MLP's roles (MLP-Mixer's `token_mixing` subtree), for the two functions below.
_TOKEN_MLP_ROLES = {"Dense_0": {"kernel": ("tokens", "hidden"), "bias": ("hidden",)},
                    "Dense_1": {"kernel": ("hidden", "tokens"), "bias": ("tokens",)}}


def _map_token_mlp(adapt, mlp: dict, source_grid: Grid, target_grid: Grid) -> dict:
    return {layer: {name: adapt(np.asarray(mlp[layer][name]), roles, source_grid, target_grid)
                    for name, roles in params.items()}
            for layer, params in _TOKEN_MLP_ROLES.items()}


def block_diagonal(mlp: dict, source_grid: Grid, target_grid: Grid) -> dict:
    """A token MLP `{Dense_0: {kernel, bias}, Dense_1: {kernel, bias}}` for the larger grid:
    S' = kh*kw*S tokens and D_S' = kh*kw*D_S hidden units (hidden units tile-major)."""
    return _map_token_mlp(block_diagonal_array, mlp, source_grid, target_grid)


def resample(mlp: dict, source_grid: Grid, target_grid: Grid) -> dict:
    """A token MLP resized over the 2-D patch grid (module docstring)."""
    return _map_token_mlp(resample_array, mlp, source_grid, target_grid)
