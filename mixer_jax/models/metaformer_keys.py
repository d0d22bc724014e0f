"""Key names and array layouts of the MetaFormer line: ours <-> timm <-> the official code.

Pure conversion on numpy arrays (dtype preserved, exact inverses, so round trips are
bitwise); `metaformer.py` adds the checks against a model's expected keys and shapes.

- Our flat keys ("stages_2_blocks_0/fc1/kernel") <-> timm's state-dict keys
  ("stages.2.blocks.0.mlp.fc1.weight"): one table of rule pairs, `_RULES`.
- Layouts: Conv [out, in, kh, kw] <-> kernel [kh, kw, in, out] (a depthwise conv's
  [C, 1, kh, kw] <-> [kh, kw, 1, C] is the same transposition); Linear [out, in] <->
  kernel [in, out]. timm runs the pointwise layers of the stages without attention as
  1x1 convs ([out, in, 1, 1]), the attention stages and heads as Linear; the official
  code (sail-sg/metaformer) uses Linear throughout.
- The official layout differs from timm's by names only (timm's `checkpoint_filter_fn`
  renames them): `downsample_layers.0.{conv,post_norm}` is the stem,
  `downsample_layers.{i}.{pre_norm,conv}` stage i's downsampling, `stages.{i}.{j}.` a
  block, `norm.` the head's norm and `head.` the classifier. RandFormer's frozen
  matrices are `stages.{i}.{j}.token_mixer.random_matrix` there and
  `stages_{i}_blocks_{j}/token_mixer/random_matrix` in our "frozen" collection.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

RANDOM_MATRIX = "random_matrix"
_BLOCK = ("stages_{i}_blocks_{j}/", "stages.{i}.blocks.{j}.")
# (our flat key, timm key); {i}, {j}, {k} are integers, {m} a layer and {p} a leaf name.
_RULES = [
    ("stem_conv/kernel", "stem.conv.weight"),
    ("stem_conv/bias", "stem.conv.bias"),
    ("stem_norm/scale", "stem.norm.weight"),
    ("stages_{i}_downsample_norm/scale", "stages.{i}.downsample.norm.weight"),
    ("stages_{i}_downsample_conv/kernel", "stages.{i}.downsample.conv.weight"),
    ("stages_{i}_downsample_conv/bias", "stages.{i}.downsample.conv.bias"),
    ("{B}norm{k}/scale", "{T}norm{k}.weight"),
    ("{B}norm{k}/bias", "{T}norm{k}.bias"),
    ("{B}layer_scale{k}", "{T}layer_scale{k}.scale"),
    ("{B}res_scale{k}", "{T}res_scale{k}.scale"),
    ("{B}token_mixer/{m}/kernel", "{T}token_mixer.{m}.weight"),
    ("{B}token_mixer/act1/{p}", "{T}token_mixer.act1.{p}"),
    ("{B}token_mixer/" + RANDOM_MATRIX, "{T}token_mixer." + RANDOM_MATRIX),
    ("{B}fc{k}/kernel", "{T}mlp.fc{k}.weight"),
    ("{B}fc{k}/bias", "{T}mlp.fc{k}.bias"),
    ("{B}act/{p}", "{T}mlp.act.{p}"),
    ("pre_head_norm/scale", "head.norm.weight"),
    ("pre_head_norm/bias", "head.norm.bias"),
    ("mlp_head_fc1/kernel", "head.fc.fc1.weight"),
    ("mlp_head_fc1/bias", "head.fc.fc1.bias"),
    ("mlp_head_norm/scale", "head.fc.norm.weight"),
    ("mlp_head_norm/bias", "head.fc.norm.bias"),
    ("head/kernel", "head.fc.fc2.weight"),  # MLP head (ConvFormer, CAFormer)
    ("head/bias", "head.fc.fc2.bias"),
    ("head/kernel", "head.fc.weight"),      # Linear head
    ("head/bias", "head.fc.bias"),
]
_FIELDS = {"i": r"\d+", "j": r"\d+", "k": r"\d+", "p": "scale|bias",
           "m": "pwconv1|dwconv|pwconv2|qkv|proj"}
_CONVS = ("stem_conv/", "_downsample_conv/", "/dwconv/")  # our kernels that stay 4-D


def _pattern(template: str, whole: bool = True) -> tuple[re.Pattern, str]:
    template = template.replace("{B}", _BLOCK[0]).replace("{T}", _BLOCK[1])
    parts = re.split(r"\{(\w)\}", template)  # literal, field, literal, field, ...
    regex = "".join(re.escape(p) if n % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})"
                    for n, p in enumerate(parts))
    return re.compile(regex + ("$" if whole else "")), template


_COMPILED = [(_pattern(ours), _pattern(theirs)) for ours, theirs in _RULES]


def _translate(key: str, forward: bool, mlp_head: bool) -> str | None:
    for (ours, ours_t), (theirs, theirs_t) in _COMPILED:
        src, dst = (ours, theirs_t) if forward else (theirs, ours_t)
        if forward and mlp_head != theirs_t.startswith("head.fc.fc2") and ours_t.startswith("head/"):
            continue
        match = src.match(key)
        if match:
            return dst.format(**match.groupdict())
    return None


def flat_name(timm_key: str) -> str | None:
    """Our flat key of a timm key, or None for a key no rule knows."""
    return _translate(timm_key, False, False)


def _attention_stages(keys) -> set[str]:
    return {m.group(1) for k in keys if (m := re.match(r"stages_(\d+)_.*/qkv/kernel$", k))}


def flat_to_timm(flat: Mapping[str, np.ndarray], *, pointwise_convs: bool = True) -> dict:
    """Our flat parameters (and frozen matrices) -> timm's state dict (torch layouts).

    With `pointwise_convs=False` every pointwise layer is a Linear (the official layout).
    """
    mlp_head = "mlp_head_fc1/kernel" in flat
    attention = _attention_stages(flat)
    out = {}
    for key, value in flat.items():
        name = _translate(key, True, mlp_head)
        if name is None:
            raise ValueError(f"Unknown MetaFormer parameter {key!r}: no timm name for it.")
        value = np.asarray(value)
        if key.endswith("/kernel"):
            if value.ndim == 4:
                value = value.transpose(3, 2, 0, 1)
            else:
                value = value.T
                stage = re.match(r"stages_(\d+)_", key)
                if pointwise_convs and stage and stage.group(1) not in attention:
                    value = value[:, :, None, None]
        out[name] = np.ascontiguousarray(value)
    return out


def timm_to_flat(state_dict: Mapping[str, np.ndarray]) -> dict:
    """timm's (or the official code's, once renamed) state dict -> our flat parameters."""
    out = {}
    for key, value in state_dict.items():
        name = _translate(key, False, False)
        if name is None:
            raise ValueError(f"Unknown MetaFormer key {key!r} in the state dict: it is not a "
                             "timm MetaFormer (poolformer, convformer, caformer) key.")
        value = np.asarray(value)
        if name.endswith("/kernel"):
            if any(c in name for c in _CONVS):
                value = value.transpose(2, 3, 1, 0)
            elif value.ndim == 2 or value.shape[2:] == (1, 1):
                value = value.reshape(value.shape[:2]).T  # Linear, or a 1x1 conv
            else:
                raise ValueError(f"{key!r} has shape {value.shape}; expected a Linear weight "
                                 "or a 1x1 conv.")
        out[name] = np.ascontiguousarray(value)
    return out


# Official key prefix <-> timm key prefix (the first match renames; the rest is kept).
_OFFICIAL = [
    ("downsample_layers.0.conv.", "stem.conv."),
    ("downsample_layers.0.post_norm.", "stem.norm."),
    ("downsample_layers.{i}.pre_norm.", "stages.{i}.downsample.norm."),
    ("downsample_layers.{i}.conv.", "stages.{i}.downsample.conv."),
    ("stages.{i}.{j}.", "stages.{i}.blocks.{j}."),
    ("norm.", "head.norm."),
    ("head.", "head.fc."),
]
_OFFICIAL_COMPILED = [(_pattern(a, whole=False), _pattern(b, whole=False)) for a, b in _OFFICIAL]


def _rename(key: str, to_timm: bool) -> str:
    for official, timm in _OFFICIAL_COMPILED:
        (src, _), (_, dst) = (official, timm) if to_timm else (timm, official)
        match = src.match(key)
        if match:
            return dst.format(**match.groupdict()) + key[match.end():]
    return key


def official_to_timm_names(state_dict: Mapping[str, np.ndarray]) -> dict:
    return {_rename(k, True): v for k, v in state_dict.items()}


def timm_to_official_names(state_dict: Mapping[str, np.ndarray]) -> dict:
    return {_rename(k, False): v for k, v in state_dict.items()}
