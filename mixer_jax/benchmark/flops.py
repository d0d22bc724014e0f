"""Analytic FLOP counts of an MLP-Mixer, and XLA's own count to cross-check them.

FLOPs are 2 x multiply-adds of every Dense and Conv (the convention of the paper's
table: Mixer-B/16 at 224 is 25.2 GFLOP per image). Norms, GELU, residual adds and
the mean pool are left out: they are a fraction of a percent of the total.

A training step counts 3x the forward pass (the backward pass computes a gradient
for the activations and one for the weights, each as large as the forward
matmul), less the stem's activation gradient, which is never needed because the
images need no gradient. These are model FLOPs: recomputation under `remat` is
not counted, so achieved FLOP/s stays comparable with and without it.
"""
from __future__ import annotations

from typing import Any

from mixer_jax import models
from mixer_jax.models import mixer


def _as_model(model: str | models.MlpMixer) -> models.MlpMixer:
    return models.create_model(model) if isinstance(model, str) else model


def _grid(image_size: int | tuple[int, int], patch: int) -> tuple[int, int]:
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    if height % patch or width % patch:
        raise ValueError(f"Image size {height}x{width} is not divisible by patch size {patch}.")
    return height // patch, width // patch


def forward_flops_terms(
    model: str | models.MlpMixer, image_size: int | tuple[int, int] = 224
) -> dict[str, int]:
    """FLOPs of one image's forward pass, split into stem / token / channel / head."""
    m = _as_model(model)
    rows, cols = _grid(image_size, m.patch_size)
    return mixer.flops(m, (rows * m.patch_size, cols * m.patch_size))


def mixer_flops(
    model: str | models.MlpMixer,
    image_size: int | tuple[int, int] = 224,
    batch: int = 1,
    *,
    train: bool = False,
) -> int:
    """Analytic FLOPs of a Mixer forward pass (or training step) on `batch` images.

    `model` is a variant name ("Mixer-B_16", 1000-class head) or an `MlpMixer`.
    With `train=True`: 3x the forward FLOPs minus the stem's input gradient.
    """
    terms = forward_flops_terms(model, image_size)
    per_image = sum(terms.values())
    if train:
        per_image = 3 * per_image - terms["stem"]
    return batch * per_image


def xla_flops(compiled: Any) -> float | None:
    """FLOPs XLA counts for a compiled function (per device), or None if not reported."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])
