"""Analytic FLOP counts of any registered model, and XLA's own count to cross-check them.

Each family's `Family.flops(model, (H, W))` gives one image's forward FLOPs by
component: 2 x multiply-adds of every Dense, Conv and matmul (the convention of the
Mixer paper's table: Mixer-B/16 at 224 is 25.2 GFLOP per image); norms, activations,
residual adds and pooling are left out.

A training step counts 3x the forward pass (the backward pass computes a gradient
for the activations and one for the weights, each as large as the forward
matmul), less the stem's activation gradient, which is never needed because the
images need no gradient. These are model FLOPs: recomputation under `remat` is
not counted, so achieved FLOP/s stays comparable with and without it.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from mixer_jax import models
from mixer_jax.models import registry


def _as_model(model: str | nn.Module) -> nn.Module:
    return models.create_model(model) if isinstance(model, str) else model


def forward_flops_terms(model: str | nn.Module,
                        image_size: int | tuple[int, int] = 224) -> dict[str, int]:
    """FLOPs of one image's forward pass by component (the family's `flops`), e.g. Mixer's
    stem / token_mixing / channel_mixing / head."""
    model = _as_model(model)
    family = registry.family_of(model)
    if family.flops is None:
        raise ValueError(f"The {family.name} family has no analytic FLOP count (Family.flops).")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return family.flops(model, size)


def model_flops(
    model: str | nn.Module,
    image_size: int | tuple[int, int] = 224,
    batch: int = 1,
    *,
    train: bool = False,
) -> int:
    """Analytic FLOPs of a forward pass (or training step) on `batch` images.

    `model` is a registered name (its default head) or a module of a registered family.
    With `train=True`: 3x the forward FLOPs minus the stem's input gradient.
    """
    terms = forward_flops_terms(model, image_size)
    per_image = sum(terms.values())
    if train:
        per_image = 3 * per_image - terms.get("stem", 0)
    return batch * per_image


mixer_flops = model_flops  # the name from when Mixer was the only family


def xla_flops(compiled: Any) -> float | None:
    """FLOPs XLA counts for a compiled function (per device), or None if not reported."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])
