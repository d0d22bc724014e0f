"""gMixer (timm's `gmixer_12_224`, `gmixer_24_224`): MLP-Mixer with SwiGLU MLPs.

Ross Wightman's experiment in timm: `MlpMixer` whose token and channel MLPs are
`GluMlp` with SiLU, i.e. `fc2(fc1_a(x) * silu(fc1_b(x)))` where timm's `fc1`
produces both halves side by side (`a` first, the gated `b` second). Here it is
`mixer.MlpMixer` with `gated=True`: `Dense_0` is the first half, `gate` the second,
and the `*_mlp_dim` fields are the width after gating (half of timm's
`hidden_features`: token MLP 192 = 0.5 x 384, channel MLP 768 = 2 x 384).
Everything else (stem, LayerNorm eps 1e-6, mean pool, head) is MLP-Mixer's;
stochastic depth is timm's rule (every block drops with `stoch_depth`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mixer_jax.models import mixer, registry

VARIANTS = {
    f"gmixer_{blocks}_224": dict(patch_size=16, num_blocks=blocks, hidden_dim=384,
                                 tokens_mlp_dim=192, channels_mlp_dim=768, gated=True,
                                 gelu_approximate=False, uniform_drop_path=True)
    for blocks in (12, 24)
}
_VALUE, _GATE = "/Dense_0/", "/gate/"
# MLP-Mixer's key map; gMixer's fc1 is `Dense_0` and `gate` side by side (split below).
KEYS = dataclasses.replace(mixer.KEYS, family="gMixer")


def architecture(flat) -> dict:
    """The `MlpMixer` fields of flat gMixer parameters, from their shapes."""
    if not any(_GATE in k for k in flat):
        raise ValueError("The parameters have no gated MLPs ('.../gate/kernel'): they are not "
                         "a gMixer.")
    return mixer.shape_fields(flat, "gMixer")


def from_timm(state_dict) -> dict:
    """timm's gMixer state dict -> flat parameters: each `fc1` split into `Dense_0`, `gate`."""
    flat = KEYS.from_timm(state_dict)
    for key in [k for k in flat if _VALUE in k]:
        if flat[key].shape[-1] % 2:
            raise ValueError(f"{key!r} has shape {flat[key].shape}: a gated fc1 has an even "
                             "number of outputs (value and gate halves).")
        flat[key], flat[key.replace(_VALUE, _GATE)] = np.split(flat[key], 2, axis=-1)
    return flat


def to_timm(flat) -> dict:
    """Flat gMixer parameters -> timm's state dict (`Dense_0`, `gate` joined into `fc1`)."""
    flat = dict(flat)
    for key in [k for k in flat if _VALUE in k]:
        gate = key.replace(_VALUE, _GATE)
        if gate not in flat:
            raise ValueError(f"The parameters have no {gate!r}: they are not a gMixer.")
        flat[key] = np.concatenate([flat[key], flat.pop(gate)], axis=-1)
    return KEYS.to_timm(flat)


FAMILY = registry.register(registry.Family(
    name="gmixer", module=mixer.MlpMixer, block_layout=mixer.BLOCKS, variants=VARIANTS,
    architecture=architecture, from_timm=from_timm, to_timm=to_timm,
    preprocessing=registry.IMAGENET, flops=mixer.flops,
))
