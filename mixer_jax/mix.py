"""Mixed-sample augmentation inside the jitted training step (pure JAX, fixed shapes).

Every method builds, for example i and its partner j, a mask m over the image
(1: pixel of i, 0: pixel of the partner's `other` image) and a weight lam:

    image_i <- m * image_i + (1 - m) * other_j,   label_i <- lam * y_i + (1 - lam) * y_j

- mixup:       lam ~ Beta(a, a); m = lam everywhere, other = the partner.
- cutmix:      lam ~ Beta(a, a), a box of relative side sqrt(1 - lam) at a uniform
               centre, clipped (timm's `rand_bbox`), or of a side in `cutmix_minmax`;
               lam <- mask mean (timm's `correct_lam`).
- fmix:        lam ~ Beta(a, a); Fourier noise with power 1/f^decay, its top
               round(lam * H * W) pixels are the example's (Harris et al. 2020).
- resizemix:   tau ~ U(resizemix_scale); the whole partner resized to tau*H x tau*W
               and pasted at a uniform position (Qin et al. 2020).
- saliencymix: a CutMix-sized box centred on the peak of the partner's
               spectral-residual saliency (Uddin et al. 2021).
- maskmix:     ceil(lam * cells) random cells of a grid of `maskmix_cell` x patch
               size stay the example's: every token comes from one image (MixPro).
For every mask method lam is the mask's mean (CutMix with `correct_lam=False`
keeps its drawn lam, as timm). The partner is the batch flipped (timm), within
the batch this function sees: under every parallel strategy that is the device's
own part of the (micro-)batch, so mixing needs no cross-device traffic.

Choice per step (timm's semantics): with probability `prob` a batch is mixed;
mixup is used with probability 1 - `switch_prob` when it and at least one mask
method are on, the mask methods share the rest equally. `mode` 'batch' draws one
method, lam and mask per batch (SaliencyMix's box still follows each partner's
saliency), 'pair' one per pair (i, B-1-i), 'elem' one per example. Labels are
smoothed by `label_smoothing` before they are mixed.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

METHODS = ("mixup", "cutmix", "fmix", "resizemix", "saliencymix", "maskmix")
MODES = ("batch", "pair", "elem")
_MIX_STREAM = 0x6D6978  # folded into the step's RNG: mixing's own stream ("mix")
_SALIENCY_SIDE = 64  # spectral-residual saliency is computed at most at 64x64 (as OpenCV)


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """`config.mix`: which methods, how often, how labels are made (see module doc)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    fmix_alpha: float = 0.0
    fmix_decay: float = 3.0
    resizemix: bool = False
    resizemix_scale: tuple[float, float] = (0.1, 0.8)
    saliencymix_alpha: float = 0.0
    maskmix_alpha: float = 0.0
    maskmix_cell: int = 1  # grid cell side, in patches
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"
    label_smoothing: float = 0.0
    correct_lam: bool = True

    @classmethod
    def from_config(cls, section) -> MixConfig:
        """From a `config.mix` ConfigDict (or dict); unset keys keep their defaults."""
        values = {k: v for k, v in dict(section or {}).items() if v is not None}
        for key in ("cutmix_minmax", "resizemix_scale"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods switched on, in `METHODS` order."""
        on = {"mixup": self.mixup_alpha > 0,
              "cutmix": self.cutmix_alpha > 0 or self.cutmix_minmax is not None,
              "fmix": self.fmix_alpha > 0, "resizemix": self.resizemix,
              "saliencymix": self.saliencymix_alpha > 0, "maskmix": self.maskmix_alpha > 0}
        return tuple(m for m in METHODS if on[m])

    @property
    def active(self) -> bool:
        """Whether the training step has anything to do (mixing or label smoothing)."""
        return bool(self.methods) or self.label_smoothing > 0

    def probabilities(self) -> tuple[float, ...]:
        """Probability of each of `methods` given that a batch is mixed."""
        masks = [m for m in self.methods if m != "mixup"]
        if not masks:
            return (1.0,) * len(self.methods)
        share = (self.switch_prob if "mixup" in self.methods else 1.0) / len(masks)
        return tuple(1.0 - self.switch_prob if m == "mixup" else share for m in self.methods)

    def problems(self, patch_size: int | None = None, image_size: int | None = None) -> list[str]:
        """What is wrong with these values (messages name the `mix.` key)."""
        out = []
        for key in ("mixup_alpha", "cutmix_alpha", "fmix_alpha", "saliencymix_alpha",
                    "maskmix_alpha"):
            if getattr(self, key) < 0:
                out.append(f"mix.{key} must be >= 0 (0 = off), not {getattr(self, key)}")
        for key in ("prob", "switch_prob"):
            if not 0 <= getattr(self, key) <= 1:
                out.append(f"mix.{key} must be in [0, 1], not {getattr(self, key)}")
        if not 0 <= self.label_smoothing < 1:
            out.append(f"mix.label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if self.mode not in MODES:
            out.append(f"mix.mode {self.mode!r} is not one of {MODES}")
        if self.fmix_decay <= 0:
            out.append(f"mix.fmix_decay must be positive, not {self.fmix_decay}")
        for key in ("cutmix_minmax", "resizemix_scale"):
            pair = getattr(self, key)
            if pair is not None and not (len(pair) == 2 and 0 < pair[0] < pair[1] <= 1):
                out.append(f"mix.{key} must be (low, high) with 0 < low < high <= 1, not {pair}")
        if self.maskmix_cell < 1:
            out.append(f"mix.maskmix_cell must be >= 1 (patches per grid cell), "
                       f"not {self.maskmix_cell}")
        elif self.maskmix_alpha > 0 and patch_size and image_size:
            if image_size % (patch_size * self.maskmix_cell):
                out.append(f"mix.maskmix_cell={self.maskmix_cell} patches of {patch_size} px "
                           f"do not tile pp.crop={image_size}")
        return out


# `config.mix` values switching one method on with its paper's usual setting (DeiT's
# mixup 0.8, alpha 1 for the others).
SETTINGS = {"mixup": {"mixup_alpha": 0.8}, "cutmix": {"cutmix_alpha": 1.0},
            "fmix": {"fmix_alpha": 1.0}, "resizemix": {"resizemix": True},
            "saliencymix": {"saliencymix_alpha": 1.0}, "maskmix": {"maskmix_alpha": 1.0}}


def alone(method: str, **changes) -> MixConfig:
    """`method` alone, with its usual setting (`SETTINGS`) and `changes`."""
    return MixConfig(**{**SETTINGS[method], **changes})


# ----------------------------------------------------------------- masks per method
# Each takes (key, lam, image, partner) for one example and returns (mask [H, W], other
# [H, W, C]); `other` is the image the mask's zeros take their pixels from.


def box_mask(top, bottom, left, right, height: int, width: int) -> jax.Array:
    """1 outside the box rows [top, bottom) x columns [left, right), 0 inside."""
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return jnp.where(inside, 0.0, 1.0).astype(jnp.float32)


def cutmix_box(lam, centre_y, centre_x, height: int, width: int):
    """timm's `rand_bbox`: side int(size * sqrt(1 - lam)) around the centre, clipped to the image.

    Returns (top, bottom, left, right)."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    top = jnp.clip(centre_y - cut_h // 2, 0, height)
    bottom = jnp.clip(centre_y + (cut_h + 1) // 2, 0, height)
    left = jnp.clip(centre_x - cut_w // 2, 0, width)
    right = jnp.clip(centre_x + (cut_w + 1) // 2, 0, width)
    return top, bottom, left, right


def _mixup(cfg, patch, key, lam, image, partner):
    return jnp.full(image.shape[:2], lam, jnp.float32), partner


def _cutmix(cfg, patch, key, lam, image, partner):
    height, width = image.shape[:2]
    if cfg.cutmix_minmax is None:
        ky, kx = jax.random.split(key)
        box = cutmix_box(lam, jax.random.randint(ky, (), 0, height),
                         jax.random.randint(kx, (), 0, width), height, width)
    else:  # timm's `rand_bbox_minmax`: sides drawn directly, box inside the image
        low, high = cfg.cutmix_minmax
        kh, kw, ky, kx = jax.random.split(key, 4)
        cut_h = jax.random.randint(kh, (), int(height * low), int(height * high))
        cut_w = jax.random.randint(kw, (), int(width * low), int(width * high))
        top = jax.random.randint(ky, (), 0, height - cut_h + 1)
        left = jax.random.randint(kx, (), 0, width - cut_w + 1)
        box = (top, top + cut_h, left, left + cut_w)
    return box_mask(*box, height, width), partner


def _uniform(key, shape, minval=0.0) -> jax.Array:
    """`jax.random.uniform` drawn flat: XLA:CPU compiles the draw of a 3-D shape 8x slower."""
    return jax.random.uniform(key, (math.prod(shape),), jnp.float32, minval).reshape(shape)


def _log_gamma(key, alpha: float, count: int) -> jax.Array:
    """log of `count` Gamma(alpha) draws, without a loop.

    Marsaglia & Tsang (2000) on alpha + 1 (boosted back by U^(1/alpha), in logs so
    that small alphas do not underflow), with a fixed number of candidates each:
    acceptance is >= 95% per candidate, so all 8 fail with probability < 1e-10
    (then the mode is used). `jax.random.beta`'s while loop costs seconds of
    compilation per program; this costs a fraction."""
    candidates = 8
    d = alpha + 1.0 - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    u = _uniform(key, (4, count, candidates), minval=1e-12)
    x = jnp.sqrt(-2.0 * jnp.log(u[0])) * jnp.cos(2.0 * jnp.pi * u[1])  # Box-Muller normal
    v = (1.0 + c * x) ** 3
    accept = (v > 0) & (jnp.log(u[2]) < 0.5 * x * x + d - d * v
                        + d * jnp.log(jnp.maximum(v, 1e-30)))
    first = jnp.argmax(accept, axis=-1)[:, None]
    v = jnp.where(jnp.any(accept, -1), jnp.take_along_axis(v, first, -1)[:, 0], 1.0)
    return jnp.log(d * v) + jnp.log(u[3, :, 0]) / alpha


def beta(key, alpha: float) -> jax.Array:
    """One Beta(alpha, alpha) draw (float32): G1 / (G1 + G2) of two Gamma(alpha) draws."""
    log_g = _log_gamma(key, alpha, 2)
    return jax.nn.sigmoid(log_g[0] - log_g[1])


def fourier_noise(key, height: int, width: int, decay: float) -> jax.Array:
    """Real noise whose spectrum falls off as 1/f^decay (FMix's low-frequency image)."""
    freq = jnp.sqrt(jnp.fft.fftfreq(height)[:, None] ** 2 + jnp.fft.rfftfreq(width)[None, :] ** 2)
    scale = 1.0 / jnp.maximum(freq, 1.0 / max(height, width)) ** decay
    # A complex normal by Box-Muller (compiles far faster than jax.random.normal).
    radius_u, phase_u = _uniform(key, (2, *freq.shape), minval=1e-12)
    gauss = jnp.sqrt(-2.0 * jnp.log(radius_u)) * jnp.exp(2j * jnp.pi * phase_u)
    return jnp.fft.irfft2(scale * gauss, s=(height, width)).astype(jnp.float32)


def _top_fraction(values: jax.Array, count) -> jax.Array:
    """1.0 at the `count` largest entries of `values` (ties broken by position), else 0."""
    flat = values.reshape(-1)
    ranks = jnp.zeros(flat.shape, jnp.int32).at[jnp.argsort(-flat)].set(
        jnp.arange(flat.size, dtype=jnp.int32))
    return (ranks < count).astype(jnp.float32).reshape(values.shape)


def _fmix(cfg, patch, key, lam, image, partner):
    height, width = image.shape[:2]
    noise = fourier_noise(key, height, width, cfg.fmix_decay)
    return _top_fraction(noise, jnp.round(lam * height * width)), partner


def _resizemix(cfg, patch, key, lam, image, partner):
    # lam = 1 - tau^2 (see _draw_lam): the partner shrunk by tau in each direction.
    height, width = image.shape[:2]
    tau = jnp.sqrt(1.0 - lam)
    box_h = jnp.round(tau * height).astype(jnp.int32)
    box_w = jnp.round(tau * width).astype(jnp.int32)
    ky, kx = jax.random.split(key)
    top = jax.random.randint(ky, (), 0, height - box_h + 1)
    left = jax.random.randint(kx, (), 0, width - box_w + 1)
    scale = jnp.maximum(jnp.stack([box_h / height, box_w / width]), 1.0 / max(height, width))
    resized = jax.image.scale_and_translate(
        partner, partner.shape, (0, 1), scale.astype(jnp.float32),
        jnp.stack([top, left]).astype(jnp.float32), method="linear", antialias=True)
    return box_mask(top, top + box_h, left, left + box_w, height, width), resized


def spectral_residual_saliency(image: jax.Array) -> jax.Array:
    """Hou & Zhang's (2007) spectral-residual saliency of an image [H, W, C] at
    most 64 pixels a side (the image is shrunk first if larger, as OpenCV does)."""
    grey = jnp.mean(image, axis=-1)
    height, width = grey.shape
    factor = max(height, width) / _SALIENCY_SIDE
    if factor > 1:
        grey = jax.image.resize(grey, (round(height / factor), round(width / factor)), "linear")
    spectrum = jnp.fft.fft2(grey)
    log_amplitude = jnp.log(jnp.abs(spectrum) + 1e-8)
    box = jnp.ones((3, 3), jnp.float32) / 9.0
    residual = log_amplitude - jax.scipy.signal.convolve2d(log_amplitude, box, mode="same")
    saliency = jnp.abs(jnp.fft.ifft2(jnp.exp(residual + 1j * jnp.angle(spectrum)))) ** 2
    taps = jnp.exp(-0.5 * (jnp.arange(-2, 3) / 1.0) ** 2)
    blur = jnp.outer(taps, taps) / jnp.sum(taps) ** 2
    return jax.scipy.signal.convolve2d(saliency, blur, mode="same").astype(jnp.float32)


def _saliencymix(cfg, patch, key, lam, image, partner):
    height, width = image.shape[:2]
    saliency = spectral_residual_saliency(partner)
    peak_y, peak_x = jnp.unravel_index(jnp.argmax(saliency), saliency.shape)
    centre_y = (peak_y * height) // saliency.shape[0]
    centre_x = (peak_x * width) // saliency.shape[1]
    box = cutmix_box(lam, centre_y, centre_x, height, width)
    return box_mask(*box, height, width), partner


def _maskmix(cfg, patch, key, lam, image, partner):
    height, width = image.shape[:2]
    cell = patch * cfg.maskmix_cell
    grid = (-(-height // cell), -(-width // cell))
    cells = math.prod(grid)
    keep = _top_fraction(_uniform(key, grid), jnp.ceil(lam * cells))
    return jnp.repeat(jnp.repeat(keep, cell, 0), cell, 1)[:height, :width], partner


_MASKS = {"mixup": _mixup, "cutmix": _cutmix, "fmix": _fmix, "resizemix": _resizemix,
          "saliencymix": _saliencymix, "maskmix": _maskmix}


def method_mask(method: str, cfg: MixConfig, patch_size: int, key, lam, image, partner):
    """(mask [H, W], other [H, W, C]) of `method` for one example at weight `lam`."""
    return _MASKS[method](cfg, patch_size, key, jnp.asarray(lam, jnp.float32), image, partner)


def _draw_lam(method: str, cfg: MixConfig, key) -> jax.Array:
    if method == "resizemix":
        low, high = cfg.resizemix_scale
        tau = jax.random.uniform(key, (), jnp.float32, low, high)
        return 1.0 - tau * tau
    alpha = getattr(cfg, f"{method}_alpha") or 1.0  # cutmix with only cutmix_minmax
    return beta(key, alpha)


def _one_method(method: str, cfg: MixConfig, patch_size: int, key, image, partner):
    """(mask, other, lam) of one example: lam drawn, mask built, lam corrected."""
    k_lam, k_mask = jax.random.split(key)
    lam = _draw_lam(method, cfg, k_lam)
    mask, other = method_mask(method, cfg, patch_size, k_mask, lam, image, partner)
    if method != "mixup" and (cfg.correct_lam or method != "cutmix" or cfg.cutmix_minmax):
        lam = jnp.mean(mask)
    return mask, other, lam


def _one_example(cfg: MixConfig, patch_size: int, key, image, partner):
    """(mask, other, lam) of one example under `cfg`'s choice of method and `prob`."""
    methods = cfg.methods
    if not methods:
        return jnp.ones(image.shape[:2], jnp.float32), image, jnp.float32(1.0)
    k_apply, k_method, k_mix = jax.random.split(key, 3)
    branches = [functools.partial(_one_method, m, cfg, patch_size) for m in methods]
    index = jax.random.choice(k_method, len(methods), p=jnp.asarray(cfg.probabilities()))
    mask, other, lam = jax.lax.switch(index, branches, k_mix, image, partner)
    apply = jax.random.uniform(k_apply) < cfg.prob
    return (jnp.where(apply, mask, 1.0), other, jnp.where(apply, lam, 1.0))


def mix(images: jax.Array, labels: jax.Array, rng: jax.Array, cfg: MixConfig,
        patch_size: int = 1):
    """Mixes a batch with its flip: (images, soft labels, lam [B], mask [B, H, W]).

    `images` [B, H, W, C] float, `labels` [B, classes] one-hot, `rng` a raw key.
    """
    size = images.shape[0]
    partners = jnp.flip(images, 0)
    one = functools.partial(_one_example, cfg, patch_size)
    if cfg.mode == "batch":  # one draw: what does not depend on the images is computed once
        mask, other, lam = jax.vmap(one, in_axes=(None, 0, 0))(rng, images, partners)
    else:
        keys = jax.random.split(rng, size)
        if cfg.mode == "pair":  # example B-1-i draws what example i draws
            first = jnp.arange(size) < (size + 1) // 2
            keys = jnp.where(first[:, None], keys, jnp.flip(keys, 0))
        mask, other, lam = jax.vmap(one)(keys, images, partners)
    mask = jnp.broadcast_to(mask, images.shape[:3])
    lam = jnp.broadcast_to(lam, (size,))
    mixed, soft = blend(images, labels, mask, other, lam, cfg.label_smoothing)
    return mixed, soft, lam, mask


def blend(images, labels, mask, other, lam, label_smoothing: float = 0.0):
    """(mask * images + (1 - mask) * other, lam-weighted labels and flipped labels).

    mask [B, H, W], other like images, lam [B]; labels are smoothed first (timm's
    `mixup_target`). Where the mask is 1 the image is returned untouched."""
    m = mask[..., None]
    mixed = jnp.where(m == 1.0, images, m * images + (1.0 - m) * other).astype(images.dtype)
    labels = labels.astype(jnp.float32)
    if label_smoothing:
        labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
    lam = lam[:, None]
    return mixed, lam * labels + (1.0 - lam) * jnp.flip(labels, 0)


Mixer = Callable[[dict, jax.Array], dict]


def make_mixer(cfg: MixConfig, patch_size: int = 1) -> Mixer | None:
    """batch {'image', 'label', ...}, key -> the batch mixed; None when `cfg` is off."""
    if not cfg.active:
        return None

    def mixer(batch: dict, rng: jax.Array) -> dict:
        images, labels, _, _ = mix(batch["image"], batch["label"], rng, cfg, patch_size)
        return {**batch, "image": images, "label": labels}

    return mixer


def step_key(rng: jax.Array) -> jax.Array:
    """Mixing's key from a (micro-)step's RNG; independent of the dropout stream."""
    return jax.random.fold_in(rng, _MIX_STREAM)


def per_device(mixer: Mixer, mesh: jax.sharding.Mesh, axis: str) -> Mixer:
    """`mixer` run by each device of `mesh` on its own part of a batch split over
    `axis`, with the device's index along `axis` folded into the key: no data moves."""
    def local(batch, rng):
        return mixer(batch, jax.random.fold_in(rng, jax.lax.axis_index(axis)))

    def sharded(batch, rng):
        specs = jax.tree.map(lambda _: P(axis), batch)
        return jax.shard_map(local, mesh=mesh, in_specs=(specs, P()), out_specs=specs)(
            batch, rng)

    return sharded


def from_model(config_section, model: Any) -> Mixer | None:
    """The mixer of `config.mix` for `model` (MaskMix's cells follow its patch size)."""
    return make_mixer(MixConfig.from_config(config_section), getattr(model, "patch_size", 1))
