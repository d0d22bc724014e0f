"""Plots for the notebooks, and the numbers behind them.

The array helpers (`token_mixing_templates`, `spatial_frequency`,
`channel_mixing_stats`, `token_pca_rgb`, `token_similarity`) are pure numpy; the `plot_*` functions
return closed matplotlib figures (a notebook shows a figure it ends a cell with,
or passes to `display`), and `LiveCurve` redraws one figure in place while
training runs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from mixer_jax import checkpoint, models


def to_unit_range(images) -> np.ndarray:
    """Model inputs in [-1, 1] -> [0, 1] for imshow."""
    return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def _subplots(num: int, ncols: int, cell: float, **kwargs):
    ncols = max(1, min(ncols, num))
    nrows = max(1, -(-num // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols, cell * nrows), squeeze=False,
                             **kwargs)
    plt.close(fig)  # shown by the notebook, once
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flat


def image_grid(images, titles: Sequence[str] | None = None,
               colors: Sequence[str] | None = None, ncols: int = 8, cell: float = 1.6):
    """A grid of images in [-1, 1], each with an optional title (and title colour)."""
    images = to_unit_range(images)
    fig, axes = _subplots(len(images), ncols, cell)
    for i, (ax, image) in enumerate(zip(axes, images)):
        ax.imshow(image, interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=8, color=colors[i] if colors else "black")
    fig.tight_layout()
    return fig


def plot_top_k(image, names: Sequence[str], probs: Sequence[float], title: str = ""):
    """An image in [-1, 1] beside a bar chart of its top classes."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3), width_ratios=(1, 1.6))
    plt.close(fig)
    left.imshow(to_unit_range(image), interpolation="nearest")
    left.axis("off")
    left.set_title(title, fontsize=9)
    order = np.arange(len(names))[::-1]
    right.barh(order, probs)
    right.set_yticks(order, list(names))
    right.set_xlim(0, 1)
    right.set_xlabel("probability")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------- token mixing


def token_mixing_templates(kernel, grid: tuple[int, int]) -> np.ndarray:
    """Token-mixing `Dense_0` kernel [S, D_S] -> [D_S, h, w]: each hidden unit's weights
    over the patch grid (tokens are in raster order), the paper's spatial templates."""
    kernel = np.asarray(kernel)
    height, width = grid
    if kernel.shape[0] != height * width:
        raise ValueError(f"A kernel over {kernel.shape[0]} tokens does not fit a "
                         f"{height}x{width} patch grid.")
    return kernel.T.reshape(-1, height, width)


def spatial_frequency(templates) -> np.ndarray:
    """Mean spatial frequency (cycles per patch, 0 for a constant map) of each [h, w] map,
    weighted by its power spectrum: low for smooth blobs, high for checkerboards."""
    templates = np.asarray(templates, np.float64)
    centred = templates - templates.mean(axis=(-2, -1), keepdims=True)
    power = np.abs(np.fft.fft2(centred)) ** 2
    fy = np.fft.fftfreq(templates.shape[-2])[:, None]
    fx = np.fft.fftfreq(templates.shape[-1])[None, :]
    radius = np.sqrt(fy**2 + fx**2)
    total = power.sum(axis=(-2, -1))
    return (power * radius).sum(axis=(-2, -1)) / np.maximum(total, 1e-30)


def plot_templates(templates, ncols: int = 16, title: str = "", cell: float = 0.6):
    """Spatial templates [n, h, w], each on its own symmetric colour scale (red +, blue -)."""
    templates = np.asarray(templates)
    fig, axes = _subplots(len(templates), ncols, cell)
    for ax, template in zip(axes, templates):
        limit = max(float(np.abs(template).max()), 1e-12)
        ax.imshow(template, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ channel mixing


def effective_rank(matrix) -> float:
    """exp(entropy of the normalised singular values): 1 for rank one, n for an isometry."""
    singular = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
    weights = singular / singular.sum()
    weights = weights[weights > 0]
    return float(np.exp(-(weights * np.log(weights)).sum()))


def channel_mixing_stats(params) -> list[dict]:
    """Per block: Frobenius norm, standard deviation and effective rank of both
    channel-mixing kernels (per-block or scanned parameters)."""
    flat = checkpoint.flatten_params(params)
    blocks = sorted({int(k.split("/")[0][len(models.BLOCK_PREFIX):]) for k in flat
                     if k.startswith(models.BLOCK_PREFIX)})
    rows = []
    for i in blocks:
        row = {"block": i}
        for layer in ("Dense_0", "Dense_1"):
            kernel = np.asarray(flat[f"{models.BLOCK_PREFIX}{i}/channel_mixing/{layer}/kernel"])
            row[f"{layer}_norm"] = float(np.linalg.norm(kernel))
            row[f"{layer}_std"] = float(kernel.std())
            row[f"{layer}_effective_rank"] = effective_rank(kernel)
        rows.append(row)
    return rows


def plot_channel_mixing(params, blocks: Sequence[int] | None = None, initial=None):
    """Channel-mixing kernels: norm and effective rank per block (dashed: `initial`
    parameters, e.g. the model's random initialisation), and value histograms of `blocks`."""
    stats = channel_mixing_stats(params)
    initial_stats = None if initial is None else channel_mixing_stats(initial)
    flat = checkpoint.flatten_params(params)
    blocks = [s["block"] for s in stats] if blocks is None else list(blocks)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    plt.close(fig)
    index = np.array([s["block"] for s in stats])
    for layer, color in (("Dense_0", "tab:blue"), ("Dense_1", "tab:orange")):
        for ax, stat in zip(axes, ("norm", "effective_rank")):
            ax.plot(index, [s[f"{layer}_{stat}"] for s in stats], "o-", color=color, label=layer)
            if initial_stats is not None:
                ax.plot(index, [s[f"{layer}_{stat}"] for s in initial_stats],
                        "--", color=color, label=f"{layer} at init")
    axes[0].set(title="kernel norm", xlabel="block")
    axes[1].set(title="effective rank", xlabel="block")
    for ax in axes[:2]:
        ax.set_xticks(index)
    for i in blocks:
        values = np.asarray(flat[f"{models.BLOCK_PREFIX}{i}/channel_mixing/Dense_0/kernel"])
        axes[2].hist(values.ravel(), bins=60, histtype="step", density=True, label=f"block {i}")
    axes[2].set(title="Dense_0 kernel values", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ token features


def token_pca_rgb(tokens, grid: tuple[int, int]) -> np.ndarray:
    """Tokens [B, S, C] -> [B, h, w, 3] in [0, 1]: the first three principal components
    (fitted over all tokens of the batch) as colours, each scaled to [0, 1]."""
    tokens = np.asarray(tokens, np.float64)
    batch, num_tokens, channels = tokens.shape
    if num_tokens != grid[0] * grid[1]:
        raise ValueError(f"{num_tokens} tokens do not fit a {grid[0]}x{grid[1]} patch grid.")
    flat = tokens.reshape(-1, channels)
    flat = flat - flat.mean(axis=0)
    _, _, components = np.linalg.svd(flat, full_matrices=False)
    projected = flat @ components[:3].T
    if projected.shape[1] < 3:  # fewer than 3 channels or tokens: pad with zeros
        projected = np.pad(projected, ((0, 0), (0, 3 - projected.shape[1])))
    low, high = projected.min(axis=0), projected.max(axis=0)
    scaled = (projected - low) / np.maximum(high - low, 1e-12)
    return scaled.reshape(batch, grid[0], grid[1], 3)


def token_similarity(tokens) -> np.ndarray:
    """Tokens [B, S, C] -> [B]: the mean cosine similarity between the distinct tokens of
    each image (1 when all tokens point the same way, about 0 for unrelated tokens)."""
    tokens = np.asarray(tokens, np.float64)
    unit = tokens / np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)
    gram = unit @ np.swapaxes(unit, 1, 2)
    num = tokens.shape[1]
    if num < 2:
        return np.ones(tokens.shape[0])
    return (gram.sum(axis=(1, 2)) - np.trace(gram, axis1=1, axis2=2)) / (num * (num - 1))


def plot_token_features(images, intermediates: Mapping[str, np.ndarray], grid: tuple[int, int],
                        layers: Sequence[str] | None = None, cell: float = 1.3):
    """One row per image: the input, then its tokens after each layer as PCA colours
    (one PCA per layer, over the batch), then the token norms of the last layer."""
    layers = list(layers or [k for k in intermediates if k != "pre_logits"])
    images = to_unit_range(images)
    pca = {name: token_pca_rgb(intermediates[name], grid) for name in layers}
    norms = np.linalg.norm(np.asarray(intermediates[layers[-1]]), axis=-1)
    columns = len(layers) + 2
    fig, axes = plt.subplots(len(images), columns, figsize=(cell * columns, cell * len(images)),
                             squeeze=False)
    plt.close(fig)
    for row, image in enumerate(images):
        panels = [image] + [pca[name][row] for name in layers] + [norms[row].reshape(grid)]
        titles = ["input"] + layers + [f"|token| {layers[-1]}"]
        for col, (panel, title) in enumerate(zip(panels, titles)):
            ax = axes[row, col]
            ax.imshow(panel, interpolation="nearest", cmap="viridis" if panel.ndim == 2 else None)
            ax.axis("off")
            if row == 0:
                ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------- curves


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
                xlabel: str = "step", ylabel: str = "", title: str = ""):
    """Several named (x, y) curves on one axis."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    plt.close(fig)
    for name, (x, y) in curves.items():
        ax.plot(x, y, "o-", markersize=3, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


class LiveCurve:
    """A curve redrawn in place as points arrive (Jupyter, Colab); silent elsewhere.

    `add(x, y)` records a point and redraws every `every` points; `draw()` redraws now.
    """

    def __init__(self, *, xlabel: str = "step", ylabel: str = "loss", title: str = "",
                 every: int = 1):
        self.xs: list[float] = []
        self.ys: list[float] = []
        self.every = max(1, every)
        self.fig, self.ax = plt.subplots(figsize=(6, 3.5))
        plt.close(self.fig)
        self._labels = dict(xlabel=xlabel, ylabel=ylabel, title=title)
        self._handle = None

    def add(self, x: float, y: float) -> None:
        self.xs.append(float(x))
        self.ys.append(float(y))
        if len(self.xs) % self.every == 0:
            self.draw()

    def draw(self) -> None:
        self.ax.clear()
        self.ax.plot(self.xs, self.ys, "-", color="tab:blue")
        self.ax.set(**self._labels)
        self.ax.grid(alpha=0.3)
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None:
            return
        if self._handle is None:
            self._handle = display(self.fig, display_id=True)
        else:
            self._handle.update(self.fig)


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None,
                   float_format: str = "{:.4f}") -> str:
    """A Markdown table of `rows` (dicts), floats formatted with `float_format`."""
    columns = list(columns or rows[0].keys())
    fmt = lambda v: float_format.format(v) if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
