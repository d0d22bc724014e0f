"""Adapting a token-mixing MLP to another patch grid (fine-tuning at another resolution).

The token-mixing MLP of a Mixer block is `Dense_0: S -> D_S`, `Dense_1: D_S -> S`,
where S = h * w is the number of patches in raster order. A new image size changes
S, so the pre-trained kernels no longer fit. Two schemes live here, both acting on
one block's `token_mixing` subtree `{Dense_0: {kernel, bias}, Dense_1: {kernel, bias}}`
of numpy arrays:

- `block_diagonal` (paper, Appendix C) for a grid larger by integer factors
  (kh, kw): the image is split into kh x kw tiles of the pre-training grid, D_S
  is widened to kh*kw*D_S, and every tile gets its own copy of the pre-trained
  MLP that only sees that tile's tokens. The model's tokens are in raster order
  over the whole image, so instead of permuting tokens we scatter the kernels'
  rows/columns: token t at (row, col) belongs to tile (row // h, col // w) and
  takes the role of token (row % h, col % w) of that tile. Right after this
  initialisation the model's logits on the large image equal the mean of the
  pre-trained model's logits on its tiles.
- `resample` for any other grid (e.g. 14x14 -> 24x24 for 224 -> 384 pixels, or a
  smaller grid): every per-token map is resized over the 2-D patch grid with
  (antialiased) bilinear interpolation, `jax.image.resize(..., "linear")`:
  `Dense_0/kernel` [S, D_S] as D_S maps of h x w, `Dense_1/kernel` [D_S, S] as
  D_S maps, and `Dense_1/bias` [S] as one map; `Dense_0/bias` is kept. Because
  `Dense_0` sums over tokens, its kernel is also scaled by S / S' so the
  pre-activations keep their scale (a spatially constant input gives the same
  hidden activations as before); `Dense_1` produces one value per token and is
  not rescaled. D_S is unchanged. On the same grid this is the identity.
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


def block_diagonal(mlp: dict, source_grid: Grid, target_grid: Grid) -> dict:
    """Paper's higher-resolution initialisation: one copy of the MLP per tile.

    Returns kernels for S' = kh*kw*S tokens and D_S' = kh*kw*D_S hidden units
    (hidden units ordered tile-major).
    """
    factors = tile_factors(source_grid, target_grid)
    if factors is None:
        raise ValueError(
            f"Block-diagonal adaptation needs integer grid factors; {source_grid} -> {target_grid} "
            "has none (use resampling)."
        )
    num_tiles = factors[0] * factors[1]
    tile, position = _tile_and_position(source_grid, target_grid)
    tokens = np.arange(tile.size)
    kernel0, bias0 = mlp["Dense_0"]["kernel"], mlp["Dense_0"]["bias"]
    kernel1, bias1 = mlp["Dense_1"]["kernel"], mlp["Dense_1"]["bias"]
    hidden = kernel0.shape[1]

    new_kernel0 = np.zeros((tile.size, num_tiles, hidden), kernel0.dtype)
    new_kernel0[tokens, tile] = kernel0[position]
    new_kernel1 = np.zeros((num_tiles, hidden, tile.size), kernel1.dtype)
    new_kernel1[tile, :, tokens] = kernel1[:, position].T
    return {
        "Dense_0": {"kernel": new_kernel0.reshape(tile.size, num_tiles * hidden),
                    "bias": np.tile(bias0, num_tiles)},
        "Dense_1": {"kernel": new_kernel1.reshape(num_tiles * hidden, tile.size),
                    "bias": bias1[position]},
    }


def _resize(maps: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    resized = jax.image.resize(maps.astype(np.float32), shape, "linear", antialias=True)
    return np.asarray(jax.device_get(resized)).astype(maps.dtype)


def resample(mlp: dict, source_grid: Grid, target_grid: Grid) -> dict:
    """Resizes the token-mixing kernels over the 2-D patch grid (module docstring)."""
    (h, w), (big_h, big_w) = source_grid, target_grid
    kernel0, kernel1 = mlp["Dense_0"]["kernel"], mlp["Dense_1"]["kernel"]
    hidden = kernel0.shape[1]
    scale = (h * w) / (big_h * big_w)
    new_kernel0 = _resize(kernel0.reshape(h, w, hidden), (big_h, big_w, hidden)) * np.asarray(
        scale, kernel0.dtype)
    new_kernel1 = _resize(kernel1.reshape(hidden, h, w), (hidden, big_h, big_w))
    new_bias1 = _resize(mlp["Dense_1"]["bias"].reshape(h, w), (big_h, big_w))
    return {
        "Dense_0": {"kernel": new_kernel0.reshape(big_h * big_w, hidden),
                    "bias": mlp["Dense_0"]["bias"]},
        "Dense_1": {"kernel": new_kernel1.reshape(hidden, big_h * big_w),
                    "bias": new_bias1.reshape(big_h * big_w)},
    }
