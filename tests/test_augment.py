"""Augmentations: each RandAugment op against PIL or geometry, inception crop."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from mixer_jax import augment


def seed(i):
    return tf.constant([i, 7], tf.int64)


@pytest.fixture(scope="module")
def photo():
    """A 24x20 RGB image with smooth structure and noise (not a constant or a ramp)."""
    y, x = np.mgrid[:24, :20]
    rng = np.random.RandomState(0)
    base = np.stack([8 * y + 10, 11 * x + 20, 120 + 60 * np.sin(x / 3.0 + y / 5.0)], -1)
    return np.clip(base + rng.randint(-15, 16, base.shape), 0, 255).astype(np.uint8)


def run(op, image, level, s=seed(0)):
    return op(tf.constant(image), level, s).numpy()


def assert_close(got, want, tolerance):
    want = np.asarray(want)
    assert got.shape == want.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - want.astype(int)).max() <= tolerance


# --- Operations against PIL ---------------------------------------------------


def test_pixel_operations_match_pil(photo):
    pil = Image.fromarray(photo)
    np.testing.assert_array_equal(run(augment.identity, photo, 1.0), photo)
    np.testing.assert_array_equal(run(augment.equalize, photo, 1.0), ImageOps.equalize(pil))
    # Magnitude 5 of 10: solarize above 128, posterize to 8 - 2 = 6 bits.
    np.testing.assert_array_equal(run(augment.solarize, photo, 0.5), ImageOps.solarize(pil, 128))
    np.testing.assert_array_equal(run(augment.posterize, photo, 0.5), ImageOps.posterize(pil, 6))
    assert_close(run(augment.autocontrast, photo, 1.0), ImageOps.autocontrast(pil), 1)
    # Stronger magnitude, stronger effect: solarize everything, posterize to 4 bits.
    np.testing.assert_array_equal(run(augment.solarize, photo, 1.0), 255 - photo)
    np.testing.assert_array_equal(run(augment.posterize, photo, 1.0), photo & 0xF0)
    np.testing.assert_array_equal(run(augment.solarize, photo, 0.0), photo)


@pytest.mark.parametrize(
    "op, enhancer, tolerance",
    [
        (augment.color, ImageEnhance.Color, 2),
        (augment.contrast, ImageEnhance.Contrast, 2),
        (augment.brightness, ImageEnhance.Brightness, 1),
        (augment.sharpness, ImageEnhance.Sharpness, 2),
    ],
)
@pytest.mark.parametrize("s", [0, 1, 2, 3])
def test_enhancements_match_pil_with_a_random_direction(photo, op, enhancer, tolerance, s):
    level = 0.6
    factor = float(augment._enhance_factor(level, seed(s)))
    assert factor == pytest.approx(1 + 0.54) or factor == pytest.approx(1 - 0.54)
    want = enhancer(Image.fromarray(photo)).enhance(factor)
    assert_close(run(op, photo, level, seed(s)), want, tolerance)


def test_enhancement_direction_is_random_and_factor_stays_positive():
    factors = {round(float(augment._enhance_factor(0.5, seed(s))), 4) for s in range(20)}
    assert factors == {0.55, 1.45}
    factors = {round(float(augment._enhance_factor(2.0, seed(s))), 4) for s in range(20)}
    assert factors == {0.1, 2.8}  # 1 - 1.8 clipped to the minimum


def test_sharpness_blends_with_pils_smooth_filter(photo):
    smooth = np.asarray(Image.fromarray(photo).filter(ImageFilter.SMOOTH))
    # Factor 0 (level 1/0.9 towards the smooth side) gives the smoothed image itself.
    level = 1 / 0.9
    s = next(seed(i) for i in range(20) if float(augment._enhance_factor(level, seed(i))) < 0.5)
    got = run(augment.sharpness, photo, level, s)
    factor = float(augment._enhance_factor(level, s))
    want = smooth + factor * (photo.astype(float) - smooth)
    assert_close(got, np.clip(np.round(want), 0, 255).astype(np.uint8), 2)


# --- Geometric operations -------------------------------------------------------


def _sign(s):
    return float(augment._random_sign(1.0, s))


def test_rotate_by_magnitude_30_is_a_quarter_turn_either_way():
    image = np.random.RandomState(1).randint(0, 256, (9, 9, 3)).astype(np.uint8)
    signs = set()
    for i in range(6):
        sign = _sign(seed(i))
        signs.add(sign)
        got = run(augment.rotate, image, 3.0, seed(i))  # 30 degrees per 10 of magnitude
        np.testing.assert_array_equal(got, np.rot90(image, k=int(sign)))
    assert signs == {-1.0, 1.0}


def test_translate_moves_by_100_pixels_at_224_and_fills_grey():
    image = np.random.RandomState(2).randint(0, 256, (4, 224, 3)).astype(np.uint8)
    for i in range(4):
        got = run(augment.translate_x, image, 1.0, seed(i))
        if _sign(seed(i)) > 0:  # out(x) = in(x + 100)
            np.testing.assert_array_equal(got[:, :124], image[:, 100:])
            assert (got[:, 124:] == 128).all()
        else:
            np.testing.assert_array_equal(got[:, 100:], image[:, :124])
            assert (got[:, :100] == 128).all()
    tall = np.transpose(image, (1, 0, 2))
    got = run(augment.translate_y, tall, 1.0, seed(0))
    np.testing.assert_array_equal(got, np.transpose(run(augment.translate_x, image, 1.0, seed(0)),
                                                    (1, 0, 2)))


def test_shear_keeps_the_first_row_and_shifts_later_rows():
    image = np.random.RandomState(3).randint(0, 256, (10, 30, 3)).astype(np.uint8)
    got = run(augment.shear_x, image, 10 / 3, seed(0))  # shear 1: row y moves by y pixels
    shift = int(_sign(seed(0)))
    for y in range(10):
        for x in range(30):
            source = x + shift * y
            want = image[y, source] if 0 <= source < 30 else 128
            np.testing.assert_array_equal(got[y, x], want)
    got_y = run(augment.shear_y, np.transpose(image, (1, 0, 2)), 10 / 3, seed(0))
    np.testing.assert_array_equal(got_y, np.transpose(got, (1, 0, 2)))


# --- RandAugment ------------------------------------------------------------------


def test_randaugment_is_deterministic_per_seed_and_varies_across_seeds(photo):
    image = tf.constant(photo)
    outputs = [augment.randaugment(image, seed(i), 2, 9).numpy() for i in range(12)]
    for i, out in enumerate(outputs[:3]):
        assert out.shape == photo.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out, augment.randaugment(image, seed(i), 2, 9).numpy())
    assert len({out.tobytes() for out in outputs}) >= 8
    np.testing.assert_array_equal(augment.randaugment(image, seed(0), 0, 9).numpy(), photo)


def test_one_randaugment_layer_applies_one_of_the_operations(photo):
    image = tf.constant(photo)
    for i in range(5):
        out = augment.randaugment(image, seed(i), 1, 5).numpy()
        layer_seed = tf.random.experimental.stateless_split(seed(i), 1)[0]
        _, op_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 2))
        candidates = [op(image, 0.5, op_seed).numpy() for op in augment.RANDAUGMENT_OPS.values()]
        assert any(np.array_equal(out, c) for c in candidates)


def test_randaugment_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        augment.randaugment(tf.zeros([4, 4, 3]), seed(0), 2, 10)


# --- Inception crop ---------------------------------------------------------------------


def test_inception_crop_cuts_a_random_box_of_5_to_100_percent_area():
    y, x = np.mgrid[:60, :50]
    image = np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8)  # pixel = its coordinates
    boxes = set()
    for i in range(20):
        crop = augment.inception_crop(tf.constant(image), seed(i)).numpy()
        h, w = crop.shape[:2]
        y0, x0 = crop[0, 0, :2]
        np.testing.assert_array_equal(crop, image[y0:y0 + h, x0:x0 + w])
        assert 0.05 * 60 * 50 * 0.9 <= h * w <= 60 * 50
        np.testing.assert_array_equal(crop, augment.inception_crop(tf.constant(image), seed(i)))
        boxes.add((y0, x0, h, w))
    assert len(boxes) >= 15
