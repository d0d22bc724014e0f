"""Training augmentations in TF ops: inception crop, RandAugment.

Mixed-sample augmentation (mixup and its family) runs on the devices: `mixer_jax.mix`.

Every random choice is a *stateless* TF op driven by an explicit seed (a
shape-[2] integer tensor), so the input pipeline can derive seeds from
(config.seed, example index) and replay exactly the same augmentations when
a run resumes.

RandAugment (Cubuk et al. 2019) uses the 14 operations of the paper. Each of
`num_layers` layers applies one uniformly chosen operation at the fixed
`magnitude`, with a random sign for the signed ones. Magnitudes follow the
usual 0..10 scale of TF's reference implementation (rotate up to 30 degrees,
shear 0.3, translate 100/224 of the image side, enhancement factor 1 +- 0.9),
and larger magnitudes (the Mixer paper uses 10..20) extrapolate linearly.
Unlike TF's reference code, where solarize and posterize get *weaker* as the
magnitude grows (solarize is a no-op from magnitude 10 on), every operation
here gets stronger with the magnitude, as in timm's "increasing" variant.
"""
from __future__ import annotations

import math
from typing import Callable

import tensorflow as tf

_MAX_LEVEL = 10.0
_ROTATE_MAX_DEGREES = 30.0
_SHEAR_MAX = 0.3
_TRANSLATE_MAX_FRACTION = 100.0 / 224.0  # 100 pixels at 224, as in TF's reference
_ENHANCE_MAX_DELTA = 0.9
_MIN_ENHANCE_FACTOR = 0.1
_FILL_VALUE = 128  # grey, for pixels that affine transforms bring in from outside


def inception_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    area_range: tuple[float, float] = (0.05, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> tf.Tensor:
    """Random crop covering `area_range` of the image with a random aspect ratio.

    The "inception crop" of vit_jax/big_vision; the caller resizes the result.
    Falls back to the whole image when no box fits after 100 attempts.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        area_range=area_range,
        aspect_ratio_range=aspect_ratio_range,
        max_attempts=100,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, size)
    crop.set_shape([None, None, image.shape[-1]])
    return crop


# --- RandAugment -----------------------------------------------------------
# Every operation maps (uint8 image [H, W, 3], level = magnitude / 10, seed)
# to a uint8 image of the same shape.


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    """Rounds and clips a float image in 0..255 to uint8."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _random_sign(value: float | tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    flip = tf.random.stateless_uniform([], seed=seed) < 0.5
    value = tf.convert_to_tensor(value, tf.float32)
    return tf.where(flip, -value, value)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL.ImageEnhance: factor 0 gives `degenerate`, 1 the image, >1 extrapolates."""
    image = tf.cast(image, tf.float32)
    degenerate = tf.cast(degenerate, tf.float32)
    return to_uint8(degenerate + factor * (image - degenerate))


def _enhance_factor(level: float, seed: tf.Tensor) -> tf.Tensor:
    delta = _random_sign(_ENHANCE_MAX_DELTA * level, seed)
    return tf.maximum(1.0 + delta, _MIN_ENHANCE_FACTOR)


def _grey(image: tf.Tensor) -> tf.Tensor:
    return tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))


def _affine(image: tf.Tensor, transform: list) -> tf.Tensor:
    """Applies a projective transform [a0, a1, a2, b0, b1, b2, c0, c1] (output -> input)."""
    transform = tf.cast(tf.stack(transform), tf.float32)[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=float(_FILL_VALUE),
        interpolation="NEAREST",
        fill_mode="CONSTANT",
    )
    return out[0]


def identity(image, level, seed):
    del level, seed
    return image


def autocontrast(image, level, seed):
    """Stretches every channel to the full 0..255 range."""
    del level, seed
    image = tf.cast(image, tf.float32)
    lo = tf.reduce_min(image, axis=[0, 1])
    hi = tf.reduce_max(image, axis=[0, 1])
    stretchable = hi > lo
    scale = tf.where(stretchable, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
    offset = tf.where(stretchable, lo, 0.0)
    return to_uint8((image - offset) * scale)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """PIL.ImageOps.equalize for one uint8 channel."""
    values = tf.cast(channel, tf.int32)
    histogram = tf.histogram_fixed_width(values, [0, 255], nbins=256)
    used = tf.boolean_mask(histogram, histogram > 0)
    step = (tf.reduce_sum(used) - used[-1]) // 255

    def equalized():
        lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
        lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
        return tf.gather(lut, values)

    return tf.cast(tf.cond(step > 0, equalized, lambda: values), tf.uint8)


def equalize(image, level, seed):
    del level, seed
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def rotate(image, level, seed):
    radians = _random_sign(_ROTATE_MAX_DEGREES * level, seed) * (math.pi / 180.0)
    height = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
    width = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
    cos, sin = tf.cos(radians), tf.sin(radians)
    # Rotation about the image centre.
    x_offset = (width - (cos * width - sin * height)) / 2.0
    y_offset = (height - (sin * width + cos * height)) / 2.0
    return _affine(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0])


def solarize(image, level, seed):
    """Inverts pixels at or above a threshold that falls from 256 to 0 at magnitude 10."""
    del seed
    threshold = 256.0 * (1.0 - level)
    return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def posterize(image, level, seed):
    """Keeps the top 8 - 4 * magnitude / 10 bits (at least 1)."""
    del seed
    bits = min(8, max(1, 8 - int(4 * level)))
    shift = tf.constant(8 - bits, tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def color(image, level, seed):
    grey = tf.image.grayscale_to_rgb(_grey(image))
    return _blend(grey, image, _enhance_factor(level, seed))


def contrast(image, level, seed):
    mean = tf.reduce_mean(_grey(image))
    return _blend(tf.fill(tf.shape(image), mean), image, _enhance_factor(level, seed))


def brightness(image, level, seed):
    return _blend(tf.zeros_like(image), image, _enhance_factor(level, seed))


def sharpness(image, level, seed):
    """Blends with PIL's SMOOTH filter; border pixels stay as they are."""
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(
        tf.cast(image, tf.float32)[None], kernel, strides=[1, 1, 1, 1], padding="VALID"
    )[0]
    smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    inner = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]]) > 0
    degenerate = tf.where(inner, smooth, tf.cast(image, tf.float32))
    return _blend(degenerate, image, _enhance_factor(level, seed))


def shear_x(image, level, seed):
    s = _random_sign(_SHEAR_MAX * level, seed)
    return _affine(image, [1.0, s, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image, level, seed):
    s = _random_sign(_SHEAR_MAX * level, seed)
    return _affine(image, [1.0, 0.0, 0.0, s, 1.0, 0.0, 0.0, 0.0])


def translate_x(image, level, seed):
    width = tf.cast(tf.shape(image)[1], tf.float32)
    dx = _random_sign(_TRANSLATE_MAX_FRACTION * level, seed) * width
    return _affine(image, [1.0, 0.0, dx, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image, level, seed):
    height = tf.cast(tf.shape(image)[0], tf.float32)
    dy = _random_sign(_TRANSLATE_MAX_FRACTION * level, seed) * height
    return _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, dy, 0.0, 0.0])


RANDAUGMENT_OPS: dict[str, Callable] = {
    "identity": identity,
    "autocontrast": autocontrast,
    "equalize": equalize,
    "rotate": rotate,
    "solarize": solarize,
    "color": color,
    "posterize": posterize,
    "contrast": contrast,
    "brightness": brightness,
    "sharpness": sharpness,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate_x,
    "translate_y": translate_y,
}


def randaugment(
    image: tf.Tensor, seed: tf.Tensor, num_layers: int, magnitude: float
) -> tf.Tensor:
    """Applies `num_layers` uniformly chosen RandAugment operations to a uint8 RGB image."""
    if image.dtype != tf.uint8:
        raise ValueError(f"randaugment expects a uint8 image, got {image.dtype}.")
    level = float(magnitude) / _MAX_LEVEL
    ops = list(RANDAUGMENT_OPS.values())
    layer_seeds = tf.random.experimental.stateless_split(seed, num_layers)

    def apply_layer(layer, image):
        choice_seed, op_seed = tf.unstack(
            tf.random.experimental.stateless_split(layer_seeds[layer], 2)
        )
        choice = tf.random.stateless_uniform([], seed=choice_seed, maxval=len(ops), dtype=tf.int32)
        branches = [lambda op=op: op(image, level, op_seed) for op in ops]
        return layer + 1, tf.ensure_shape(tf.switch_case(choice, branches), image.shape)

    # A loop, not a Python unroll: the 14 operations are traced once, not per layer.
    _, image = tf.while_loop(lambda layer, _: layer < num_layers, apply_layer, (0, image))
    return image
