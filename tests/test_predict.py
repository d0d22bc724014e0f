"""Tests for mixer_jax.predict and mixer_jax.labels: checkpoints (npz and orbax),
images of every colour mode and size, batching, label names, clear errors."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("mixer_jax.checkpoint")
pytest.importorskip("mixer_jax.input_pipeline")

from mixer_jax import checkpoint, input_pipeline, labels, models, predict  # noqa: E402

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def random_params(model, size, seed=0, scale=0.3):
    """Random values in every parameter (the head included, which init zeroes), so
    that different images get different predictions. Drawn with numpy: fast."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32),
                        models.param_shapes(model, (size, size, 3)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A Mixer-Ti_4 (32px, 10 classes) saved as a published-layout npz."""
    model = models.create_model("Mixer-Ti_4", num_classes=10)
    params = random_params(model, 32)
    path = tmp_path_factory.mktemp("ckpt") / "Mixer-Ti_4.npz"
    checkpoint.save_npz(params, str(path))
    return model, params, str(path)


def make_images(directory):
    """Files of several formats, colour modes and sizes, and the uint8 RGB array
    each should decode to (computed here independently of predict's reader)."""
    rng = np.random.default_rng(0)

    def noisy(shape, base, high=255, dtype=np.uint8):  # distinct overall colours
        return np.clip(rng.normal(base, high / 8, shape), 0, high).astype(dtype)

    rgb = noisy((50, 70, 3), (230, 40, 40))
    gray = noisy((40, 40), 30)
    rgba = noisy((33, 20, 4), (20, 200, 90, 128))
    palette = Image.fromarray(noisy((64, 48, 3), (60, 60, 220))).quantize(16)
    gray16 = noisy((36, 36), 50000, high=65535, dtype=np.uint16)
    files = {
        "rgb.png": (Image.fromarray(rgb), rgb),
        "gray.png": (Image.fromarray(gray), np.repeat(gray[..., None], 3, axis=-1)),
        "rgba.png": (Image.fromarray(rgba), rgba[..., :3]),
        "palette.png": (palette, np.asarray(palette.convert("RGB"))),
        "gray16.png": (Image.fromarray(gray16),
                       np.repeat(np.round(gray16 / 257).astype(np.uint8)[..., None], 3, -1)),
        "big.bmp": (Image.fromarray(np.tile(rgb, (3, 2, 1))), np.tile(rgb, (3, 2, 1))),
    }
    expected = {}
    for name, (image, pixels) in files.items():
        image.save(directory / name)
        expected[str(directory / name)] = pixels
    return expected


def direct_probabilities(model, params, pixels, crop=32, resize=37):
    """What the model gives on an image, without predict's code."""
    image = np.asarray(input_pipeline.preprocess_for_eval(pixels, crop, resize=resize))
    return np.asarray(jax.nn.softmax(model.apply({"params": params}, image[None]))[0])


def test_loaded_model_matches_the_file(tiny):
    model, params, path = tiny
    loaded = predict.load_model(path, variant="Mixer-Ti_4")
    assert loaded.image_size == 32 and loaded.model.num_classes == 10
    assert loaded.model.patch_size == 4 and loaded.model.hidden_dim == 64
    jax.tree.map(np.testing.assert_array_equal, loaded.params, params)


def test_predictions_equal_direct_model_calls(tiny, tmp_path):
    model, params, path = tiny
    expected = make_images(tmp_path)
    for pixels, path_ in zip(expected.values(), expected):  # the reader, independently checked
        np.testing.assert_array_equal(predict.load_image(path_), pixels)
    loaded = predict.load_model(path)
    paths = list(expected)
    # Batch 4 over 6 files: a full batch, then a padded one.
    results = predict.predict_files(paths, loaded, top_k=3, batch_size=4, label_names=CLASSES)
    assert [r["path"] for r in results] == paths
    top_classes = set()
    for r in results:
        probs = direct_probabilities(model, params, expected[r["path"]])
        order = np.argsort(-probs, kind="stable")[:3]
        assert [t["class"] for t in r["top"]] == order.tolist()
        assert [t["label"] for t in r["top"]] == [CLASSES[c] for c in order]
        np.testing.assert_allclose([t["probability"] for t in r["top"]], probs[order],
                                   rtol=1e-4, atol=1e-6)
        top_classes.add(int(order[0]))
    assert len(top_classes) > 1  # the images really are told apart
    # In micro-batches of 2: the same predictions, in the same order.
    pieces = predict.predict_files(paths, loaded, top_k=3, batch_size=4, microbatch=2,
                                   label_names=CLASSES)
    assert [[t["class"] for t in r["top"]] for r in pieces] == \
        [[t["class"] for t in r["top"]] for r in results]
    np.testing.assert_allclose([t["probability"] for r in pieces for t in r["top"]],
                               [t["probability"] for r in results for t in r["top"]],
                               rtol=1e-5, atol=1e-7)


def test_command_line_prints_labels_and_reports_unreadable_files(tiny, tmp_path, capsys):
    _, _, path = tiny
    for name in CLASSES:  # an image folder: its class names are the labels
        (tmp_path / "folder" / "train" / name).mkdir(parents=True)
    image = tmp_path / "x.png"
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(image)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    status = predict.main([f"--checkpoint={path}", f"--labels={tmp_path / 'folder'}",
                           "--top_k=2", str(image), str(broken)])
    text = capsys.readouterr().out
    assert status == 1
    lines = text.splitlines()
    assert lines[0] == str(image)
    assert lines[1].strip().endswith(")") and lines[1].split()[1] in CLASSES
    assert lines[3].startswith(f"{broken}: error: Cannot read image")
    status = predict.main([f"--checkpoint={path}", "--json", str(image)])
    (result,) = json.loads(capsys.readouterr().out)
    assert status == 0 and len(result["top"]) == 5 and result["top"][0]["label"] is None


def test_orbax_checkpoint_in_scanned_layout(tiny, tmp_path):
    import orbax.checkpoint as ocp

    model, params, npz = tiny
    manager = ocp.CheckpointManager(tmp_path / "run", item_names=("params",))
    manager.save(7, args=ocp.args.Composite(
        params=ocp.args.StandardSave(models.stack_blocks(params))))
    manager.wait_until_finished()
    manager.close()
    image = tmp_path / "x.png"
    Image.fromarray(np.arange(24 * 24 * 3, dtype=np.uint8).reshape(24, 24, 3)).save(image)
    from_npz = predict.predict_files([str(image)], predict.load_model(npz))
    for where in (tmp_path / "run", tmp_path / "run" / "7"):  # work dir, step dir
        loaded = predict.load_model(str(where), variant="Mixer-Ti_4")
        assert predict.predict_files([str(image)], loaded) == from_npz


def test_clear_errors(tiny, tmp_path):
    _, _, path = tiny
    with pytest.raises(predict.PredictError, match="does not exist"):
        predict.load_model(str(tmp_path / "missing.npz"))
    with pytest.raises(predict.PredictError, match="is Mixer-Ti_4, not Mixer-B_16"):
        predict.load_model(path, variant="Mixer-B_16")
    with pytest.raises(predict.PredictError, match="64 patches"):
        predict.load_model(path, image_size=48)
    with pytest.raises(predict.PredictError, match="No image files"):
        predict.main([f"--checkpoint={path}"])
    with pytest.raises(predict.PredictError, match="--microbatch=3 does not divide --batch=4"):
        predict.predict_files(["x.png"], predict.load_model(path), batch_size=4, microbatch=3)
    with pytest.raises(ValueError, match="has 1000 classes but the model has 10"):
        labels.label_names("imagenet2012", 10)


def test_label_sources(tmp_path):
    names = labels.label_names(None, 1000)
    assert len(names) == 1000 and names[0] == "tench, Tinca tinca"
    assert names[999] == "toilet tissue, toilet paper, bathroom tissue"
    assert labels.label_names(None, 21843) is None
    with pytest.raises(ValueError, match="ImageNet-21k"):
        labels.label_names("imagenet21k", 21843)
    assert labels.label_names("oxford_iiit_pet", 37)[:2] == ["Abyssinian", "american_bulldog"]
    data_dir = str(tmp_path / "tfds")  # nothing prepared there
    assert labels.label_names("oxford_flowers102", 102, data_dir=data_dir)[0] == "pink primrose"
    # cifar10's names come with its prepared files; before that tfds knows only numbers.
    assert labels.label_names("cifar10", 10, data_dir=data_dir) is None
    with pytest.raises(ValueError, match="has 37 classes but the model has 10"):
        labels.label_names("oxford_iiit_pet", 10)
    with pytest.raises(ValueError, match="does not exist"):
        labels.label_names(str(tmp_path / "missing.txt"), 10)
    names_file = tmp_path / "names.txt"
    names_file.write_text("cat\ndog\n")
    assert labels.label_names(str(names_file), 2) == ["cat", "dog"]


def test_folder_labels_follow_the_training_pipeline(tmp_path):
    for split in ("train", "test"):
        for name in ("zebra", "Apple", "mango"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / name / "a.png")
    import ml_collections

    config = ml_collections.ConfigDict({"dataset": str(tmp_path), "batch": 2,
                                        "pp": {"train": "train", "test": "test", "crop": 8}})
    info = input_pipeline.get_dataset_info(config)
    assert labels.label_names(str(tmp_path), 3) == info.label_names == ["Apple", "mango", "zebra"]


def test_preprocessing_stored_with_the_weights_is_used(tiny, tmp_path):
    """A run's checkpoint meta says ImageNet statistics and no resize: predict follows it."""
    from mixer_jax import train_checkpoint

    model, params, _ = tiny
    imagenet = models.registry.IMAGENET
    meta = {"model_name": "Mixer-Ti_4", "preprocessing": {
        "mean": list(imagenet.mean), "std": list(imagenet.std), "input_size": 32,
        "crop_pct": 1.0, "interpolation": "bilinear"}}
    train_checkpoint.save_params(params, str(tmp_path / "run"), meta=meta)
    loaded = predict.load_model(str(tmp_path / "run"))
    assert loaded.preprocessing.mean == imagenet.mean and loaded.preprocessing.crop_pct == 1.0
    pixels = np.random.default_rng(3).integers(0, 256, (40, 50, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    (result,) = predict.predict_files([str(tmp_path / "x.png")], loaded, top_k=10)
    image = np.asarray(input_pipeline.preprocess_for_eval(
        pixels, 32, resize=32, mean=imagenet.mean, std=imagenet.std))
    expected = np.asarray(jax.nn.softmax(model.apply({"params": params}, image[None]))[0])
    got = np.zeros(10)
    got[[t["class"] for t in result["top"]]] = [t["probability"] for t in result["top"]]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert not np.allclose(expected, direct_probabilities(model, params, pixels), atol=1e-3)
