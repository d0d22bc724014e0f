"""The official IdentityFormer / RandFormer checkpoints (sail-sg/metaformer; not in timm).

The official repository publishes these models as PyTorch state dicts
(`identityformer_s12.pth`, ..., `randformer_m48.pth`) in its own key layout:
`downsample_layers.{i}.*` (the stem and the downsampling convs), `stages.{i}.{j}.*` (block
j of stage i), `norm.*`, `head.*`; a RandFormer's frozen mixing matrices are
`stages.{i}.{j}.token_mixer.random_matrix`. `read_official` reads one -- a `.pth` through
`torch.load(weights_only=True)` when torch is installed, a `.safetensors` in that layout
through safetensors' numpy API, or a state dict (timm_weights' file readers) -- recognises
the line (IdentityFormer or RandFormer) from its keys and the variant from its shapes, and
returns the parameters and, for RandFormer, the matrices as the model's constants
(`{"frozen": ...}`), exactly as the file has them (a RandFormer's image size is the one its
matrices' token count fixes: 224 for the published files).

Everywhere weights are read, these files are too: `finetune.read_source` tries this reader
before timm's (so `load_pretrained`, `config.pretrained` and `predict --checkpoint` take
them), `checkpoint.load_official` gives the variables, and `convert official-to-orbax`
writes an orbax checkpoint of them. The key layout is `models.metaformer.from_official` /
`to_official`'s; this module knows the files.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from mixer_jax import checkpoint, models, timm_weights
from mixer_jax.models import metaformer


def is_official_source(source) -> bool:
    """Whether `source` (a state dict, or a `.pth`/`.safetensors` file) is in the official
    layout, from its keys (a file's arrays are not read). A file that cannot be read is
    left to timm's reader, whose errors say why."""
    if isinstance(source, Mapping):
        return timm_weights.is_timm_source(source) and metaformer.official_line(source) is not None
    path = os.fspath(source)
    if not (os.path.isfile(path) and timm_weights.is_timm_source(path)):
        return False
    try:
        keys = timm_weights.file_keys(path)
    except checkpoint.CheckpointError:
        return False
    return metaformer.official_line(dict.fromkeys(keys)) is not None


def read_official(source) -> timm_weights.TimmWeights:
    """An official IdentityFormer/RandFormer file (or state dict) -> the weights record
    `read_timm` gives (`name`: the published variant its shapes are, None for another
    architecture; `constants`: a RandFormer's frozen matrices)."""
    state_dict, label = timm_weights.read_state_dict(source)
    try:
        variables = metaformer.from_official(state_dict)
        size = metaformer.init_image_size(variables)
    except (ValueError, KeyError) as e:  # KeyError: an array the architecture is read from
        raise checkpoint.CheckpointError(
            f"{label} is not an official IdentityFormer/RandFormer checkpoint: {e} (The "
            "official PoolFormer v2, ConvFormer and CAFormer weights are timm's too: load "
            "those with checkpoint.load_timm.)") from None
    flat = checkpoint.flatten_variables(variables)[0]
    family = models.get_family(metaformer.official_line(state_dict))
    params, constants = models.split_variables(variables)
    head = flat.get("head/kernel")
    return timm_weights.TimmWeights(
        name=timm_weights.variant_of(family, flat), params=params,
        num_classes=None if head is None else head.shape[-1],
        preprocessing=dataclasses.replace(family.preprocessing, input_size=size),
        source=label, constants=constants)


def load_official(source) -> dict:
    """The variables (`{"params": ..., "frozen": ...}` for RandFormer) of an official
    IdentityFormer/RandFormer file or state dict (see `read_official`)."""
    return read_official(source).variables
