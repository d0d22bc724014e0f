"""Input pipeline: sources, host sharding, eval padding, exact resume, errors."""
import collections
import math
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from mixer_jax import input_pipeline as ip
from mixer_jax import sklearn_digits


def make_config(dataset, data_dir=None, **overrides):
    pp = dict(train="train", test="test", crop=8, resize=None, inception_crop=False,
              flip=False, randaugment=None)
    pp.update(overrides.pop("pp", {}))
    config = dict(dataset=str(dataset), tfds_data_dir=data_dir, tfds_manual_dir=None, pp=pp,
                  batch=8, batch_eval=8, shuffle_buffer=64, seed=0)
    config.update(overrides)
    return ml_collections.ConfigDict(config)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tfds data dir holding the embedded dataset (built by the first use)."""
    return str(tmp_path_factory.mktemp("tfds"))


# Folder dataset whose every image carries its id: pixel (R, G) = (id % 256, id // 256).
FOLDER_CLASSES = {"train": {"cat": 13, "dog": 11, "emu": 13}, "test": {"cat": 5, "dog": 7}}


def _write_id_image(path, example_id):
    pixels = np.zeros((4, 4, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = example_id % 256, example_id // 256, 77
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """{split}/{class}/{id}.png with unique ids; returns (root, {id: class})."""
    root = tmp_path_factory.mktemp("images")
    classes, next_id = {}, 0
    for split, counts in FOLDER_CLASSES.items():
        for cls, count in counts.items():
            os.makedirs(root / split / cls)
            for _ in range(count):
                _write_id_image(root / split / cls / f"{next_id:03d}.png", next_id)
                classes[next_id] = cls
                next_id += 1
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root, classes


def image_ids(images):
    """Ids back from [-1, 1] images written by _write_id_image (crop 4, no resize)."""
    pixels = np.round((np.asarray(images) + 1) * 127.5).astype(int)
    return list(pixels[:, 0, 0, 0] + 256 * pixels[:, 0, 0, 1])


# --- Embedded dataset ---------------------------------------------------------


def test_sklearn_digits_holds_the_sklearn_images_in_a_fixed_split(tfds_dir):
    from sklearn.datasets import load_digits

    builder = sklearn_digits.prepare(tfds_dir)
    assert builder.info.splits["train"].num_examples == 1437
    assert builder.info.splits["test"].num_examples == 360
    assert builder.info.features["label"].names == [str(d) for d in range(10)]
    splits = {
        split: [(ex["image"], int(ex["label"])) for ex in tfds.as_numpy(builder.as_dataset(split))]
        for split in ("train", "test")
    }
    digits = load_digits()
    expected = np.round(digits.images * (255 / 16)).astype(np.uint8)
    order = np.random.RandomState(0).permutation(1797)
    for split, indices in (("train", order[:1437]), ("test", order[1437:])):
        images = splits[split]
        assert all(img.shape == (8, 8, 3) and img.dtype == np.uint8 for img, _ in images)
        assert all((img == img[..., :1]).all() for img, _ in images)  # grey as RGB
        got = collections.Counter((img[..., 0].tobytes(), label) for img, label in images)
        want = collections.Counter(
            (expected[i].tobytes(), int(digits.target[i])) for i in indices
        )
        assert got == want


def test_a_build_that_loses_the_race_to_another_process_keeps_the_winners(
    tmp_path, monkeypatch
):
    """Two processes building at once: the second rename fails and must be harmless."""
    build = sklearn_digits.SklearnDigits.download_and_prepare
    rival_started = []

    def build_then_let_a_rival_finish_first(self, **kwargs):
        build(self, **kwargs)
        if not rival_started:  # the rival's own build takes the plain path
            rival_started.append(True)
            assert sklearn_digits.prepare(str(tmp_path)).is_prepared()

    monkeypatch.setattr(
        sklearn_digits.SklearnDigits, "download_and_prepare", build_then_let_a_rival_finish_first
    )
    builder = sklearn_digits.prepare(str(tmp_path))
    assert rival_started and builder.is_prepared()
    assert os.listdir(tmp_path) == ["sklearn_digits"]  # no temporary build left behind
    assert builder.info.splits["test"].num_examples == 360
    assert len(list(builder.as_dataset(split="test"))) == 360


# --- Dataset info, batches ---------------------------------------------------------


def test_dataset_info_of_the_embedded_dataset(tfds_dir):
    info = ip.get_dataset_info(make_config("sklearn_digits", tfds_dir, pp={"train": "train[:10%]"}))
    assert info == ip.DatasetInfo(
        num_classes=10, num_train_examples=144, num_eval_examples=360,
        label_names=[str(d) for d in range(10)],
    )


def test_train_batches_are_host_local_one_hot_and_in_range(tfds_dir):
    config = make_config("sklearn_digits", tfds_dir, batch=16,
                         pp={"crop": 12, "inception_crop": True, "flip": True})
    batches = list(ip.train_dataset(config, process_index=1, process_count=2).take(3))
    for batch in batches:
        assert batch["image"].shape == (8, 12, 12, 3) and batch["image"].dtype == tf.float32
        assert batch["label"].shape == (8, 10) and batch["label"].dtype == tf.float32
        assert -1 <= np.min(batch["image"]) < 0 < np.max(batch["image"]) <= 1
        np.testing.assert_array_equal(np.sort(batch["label"], axis=1)[:, -1], 1)
        np.testing.assert_array_equal(np.sum(batch["label"], axis=1), 1)


def _stream_ids(config, num_batches, **kw):
    return [
        image_ids(b["image"]) for b in ip.train_dataset(config, **kw).take(num_batches)
    ]


def test_each_epoch_is_a_reshuffled_pass_over_the_host_shard(folder):
    root, _ = folder
    config = make_config(root, pp={"crop": 4})  # 37 train images, batches of 8
    ids = sum(_stream_ids(config, 10), [])
    first, second = ids[:37], ids[37:74]
    assert sorted(first) == sorted(second) == sorted(set(first)) and len(set(first)) == 37
    assert first != second  # a new order every epoch
    assert sum(_stream_ids(make_config(root, pp={"crop": 4}, seed=1), 5), [])[:37] != first


def test_train_shards_of_two_hosts_are_disjoint_and_equal_sized(folder):
    root, _ = folder
    config = make_config(root, pp={"crop": 4}, batch=4)  # 2 examples per host and batch
    shards = [
        sum(_stream_ids(config, 18, process_index=i, process_count=2), [])
        for i in range(2)
    ]
    epoch = 37 // 2  # one example dropped so that hosts stay in step
    host_sets = [set(ids[:epoch]) for ids in shards]
    assert all(len(s) == epoch for s in host_sets)
    assert not host_sets[0] & host_sets[1]
    assert all(set(ids) == s for ids, s in zip(shards, host_sets))  # later epochs: same shard


@pytest.mark.slow
def test_resume_continues_exactly_across_epoch_boundaries(tfds_dir):
    # 37 examples, batches of 8: batch 4 straddles the first epoch boundary.
    config = make_config(
        "sklearn_digits", tfds_dir,
        pp={"train": "train[:37]", "crop": 8, "inception_crop": True, "flip": True,
            "randaugment": (2, 15)},
    )
    reference = list(ip.train_dataset(config).take(11))
    for start in (4, 9):
        resumed = list(ip.train_dataset(config, start_step=start).take(11 - start))
        for want, got in zip(reference[start:], resumed):
            np.testing.assert_array_equal(want["image"], got["image"])
            np.testing.assert_array_equal(want["label"], got["label"])
    # Augmentation is on: the second epoch does not repeat the first one's images.
    assert not np.array_equal(reference[0]["image"], reference[5]["image"])


# --- Evaluation -------------------------------------------------------------


def _eval_examples(config, process_count):
    """(per-host batch counts, Counter of real examples, padding examples)."""
    counts, real, padding = [], collections.Counter(), []
    for index in range(process_count):
        ds = ip.eval_dataset(config, process_index=index, process_count=process_count)
        batches = list(tfds.as_numpy(ds))
        assert len(batches) == len(ds)
        counts.append(len(batches))
        for b in batches:
            for image, label, mask in zip(b["image"], b["label"], b["mask"]):
                assert mask in (0.0, 1.0)
                if mask:
                    real[(image.tobytes(), int(np.argmax(label)))] += 1
                else:
                    padding.append((image, label))
    return counts, real, padding


@pytest.mark.parametrize(
    "split, batch_eval, process_count",
    [("test", 16, 2), ("test[:37]", 16, 2), ("test[:37]", 5, 1), ("test[:1]", 4, 2)],
)
def test_eval_counts_every_example_exactly_once(tfds_dir, split, batch_eval, process_count):
    config = make_config("sklearn_digits", tfds_dir, batch_eval=batch_eval, pp={"test": split})
    counts, real, padding = _eval_examples(config, process_count)
    builder = sklearn_digits.prepare(tfds_dir)
    expected = collections.Counter(
        (ip.preprocess_for_eval(ex["image"], 8).numpy().tobytes(), int(ex["label"]))
        for ex in builder.as_dataset(split=split)
    )
    assert real == expected
    num_examples = sum(expected.values())
    host_batch = batch_eval // process_count
    assert len(set(counts)) == 1  # every host runs the same number of batches
    assert counts[0] == math.ceil(math.ceil(num_examples / process_count) / host_batch)
    assert len(padding) == counts[0] * batch_eval - num_examples
    assert all(not image.any() and not label.any() for image, label in padding)


def test_eval_of_a_folder_covers_each_file_once_with_its_class(folder):
    root, classes = folder
    config = make_config(root, batch_eval=6, pp={"crop": 4})
    labels = ip.get_dataset_info(config).label_names
    assert labels == ["cat", "dog", "emu"]  # union of the splits' classes, sorted
    seen = []
    for index in range(2):
        for b in ip.eval_dataset(config, process_index=index, process_count=2):
            for example_id, label, mask in zip(image_ids(b["image"]), b["label"], b["mask"]):
                if mask:
                    seen.append(example_id)
                    assert labels[int(np.argmax(label))] == classes[example_id]
    assert sorted(seen) == [i for i in classes if i >= 37]  # the 12 test images


# --- Image folders: formats --------------------------------------------------


def test_folder_reads_any_format_and_channel_count(tmp_path):
    y, x = np.mgrid[:6, :5]
    rgb = np.stack([30 * y, 40 * x, 200 - 10 * (x + y)], -1).astype(np.uint8)  # smooth for JPEG
    grey = rgb[..., 0]
    cases = {  # file name -> (PIL image, expected RGB, exact?)
        "grey.png": (Image.fromarray(grey), np.stack([grey] * 3, -1), True),
        "grey_alpha.png": (Image.fromarray(np.stack([grey, grey], -1), "LA"),
                           np.stack([grey] * 3, -1), True),
        "rgba.png": (Image.fromarray(np.concatenate([rgb, rgb[..., :1]], -1), "RGBA"), rgb, True),
        "rgb.bmp": (Image.fromarray(rgb), rgb, True),
        "rgb.tiff": (Image.fromarray(rgb), rgb, True),  # decoded by PIL, not TF
        "rgb.webp": (Image.fromarray(rgb), rgb, False),
        "rgb.jpg": (Image.fromarray(rgb), rgb, False),
    }
    os.makedirs(tmp_path / "test" / "a")
    for name, (image, _, _) in cases.items():
        kwargs = {"lossless": True} if name.endswith("webp") else {}
        image.save(tmp_path / "test" / "a" / name, **kwargs)
    source = ip._folder_source(str(tmp_path))
    records = list(source.read([("test", 0, len(cases))]))
    assert len(records) == len(cases)
    for record in records:
        name = os.path.basename(record["image"].numpy().decode())
        _, expected, exact = cases[name]
        decoded = source.decode(record["image"]).numpy()
        assert decoded.shape == (6, 5, 3) and decoded.dtype == np.uint8, name
        tolerance = 0 if exact else 40
        assert np.abs(decoded.astype(int) - expected).max() <= tolerance, name


# --- Preprocessing ------------------------------------------------------------


def test_preprocess_for_eval_resizes_shorter_side_then_centre_crops():
    image = np.zeros((20, 40, 3), np.uint8)
    image[2:18, 12:28] = 255  # what survives 20x40 -> 10x20 -> centre 8x8
    out = ip.preprocess_for_eval(image, 8, resize=10).numpy()
    assert out.shape == (8, 8, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[1:-1, 1:-1], 1.0)
    wide = ip.preprocess_for_eval(image, 8).numpy()  # no resize: the whole image squeezed
    assert (wide[:, 0] < -0.99).all() and (wide[4, 3:5] > 0.99).all()


@pytest.mark.parametrize("shape", [(9, 7), (9, 7, 1), (9, 7, 2), (9, 7, 4)])
def test_preprocess_for_eval_maps_any_channel_count_to_rgb_in_range(shape):
    image = np.full(shape, 51, np.uint8)
    out = ip.preprocess_for_eval(image, 5).numpy()
    assert out.shape == (5, 5, 3)
    np.testing.assert_allclose(out, 51 / 127.5 - 1, atol=1e-6)
    white = ip.preprocess_for_eval(np.full(shape, 255, np.uint8), 5)
    np.testing.assert_allclose(white, 1.0, atol=1e-6)
    np.testing.assert_allclose(ip.preprocess_for_eval(np.zeros(shape, np.uint8), 5), -1.0)


def test_bad_inputs_give_clear_errors(tfds_dir):
    with pytest.raises(ValueError, match="uint8"):
        ip.preprocess_for_eval(np.zeros((4, 4, 3), np.float32), 4)
    with pytest.raises(ValueError, match="multiple of the number of hosts"):
        ip.train_dataset(make_config("sklearn_digits", tfds_dir, batch=9), process_index=0,
                         process_count=2)
    with pytest.raises(ValueError, match="Bad split 'validation'"):
        ip.get_dataset_info(make_config("sklearn_digits", tfds_dir, pp={"train": "validation"}))
    with pytest.raises(ValueError, match="eval resize"):
        ip.eval_dataset(make_config("sklearn_digits", tfds_dir, pp={"resize": 4}))


# --- Missing datasets, manual builds, named tfds datasets ------------------------


@pytest.fixture
def no_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline tried to download or build a dataset")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


def test_unprepared_dataset_raises_how_to_get_it_without_downloading(tmp_path, no_downloads):
    with pytest.raises(ip.DatasetNotPreparedError) as error:
        ip.get_dataset_info(make_config("cifar10", str(tmp_path)))
    message = str(error.value)
    assert "'cifar10'" in message and str(tmp_path) in message
    assert f"tfds build cifar10 --data_dir={tmp_path}" in message

    with pytest.raises(ip.DatasetNotPreparedError, match="manual_dir") as error:
        ip.train_dataset(make_config("imagenet2012", str(tmp_path)))
    assert "ILSVRC2012_img_train.tar" in str(error.value)

    with pytest.raises(ip.DatasetNotPreparedError, match="neither a directory"):
        ip.get_dataset_info(make_config(str(tmp_path / "no_such_dir"), str(tmp_path)))


class MixerTestManual(tfds.core.GeneratorBasedBuilder):
    """A manual-download dataset: class-named PNGs put in manual_dir by the user."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put <class>_<n>.png files in manual_dir."
    code_path = epath.Path(__file__)  # see sklearn_digits.SklearnDigits.code_path

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["a", "b"]),
        }))

    def _split_generators(self, dl_manager):
        files = sorted(dl_manager.manual_dir.iterdir())
        return {"train": self._generate_examples(files), "test": self._generate_examples(files)}

    def _generate_examples(self, files):
        for path in files:
            yield path.name, {"image": path, "label": path.name[0]}


def test_manual_dataset_is_built_from_tfds_manual_dir(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    for i, cls in enumerate("aab"):
        Image.fromarray(np.full((3 + i, 5, 3), 40 * i, np.uint8)).save(manual / f"{cls}_{i}.png")
    data_dir = str(tmp_path / "data")
    config = make_config("mixer_test_manual", data_dir, batch_eval=2)
    with pytest.raises(ip.DatasetNotPreparedError, match="Put <class>_<n>.png"):
        ip.get_dataset_info(config)
    config.tfds_manual_dir = str(manual)
    info = ip.get_dataset_info(config)
    assert (info.num_classes, info.num_train_examples, info.label_names) == (2, 3, ["a", "b"])
    batches = list(tfds.as_numpy(ip.eval_dataset(config)))
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches]).argmax(axis=1)
    grey = np.concatenate([b["image"][b["mask"] > 0, 0, 0, 0] for b in batches])
    grey = np.round((grey + 1) * 127.5)
    assert sorted(zip(grey, labels)) == [(0, 0), (40, 0), (80, 1)]  # files a_0, a_1, b_2


def test_named_tfds_dataset_flows_through_the_pipeline(tmp_path):
    """cifar10 with tfds' mock data: its real features (32x32 PNG images, 10 classes)."""
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    split_infos = [tfds.core.SplitInfo(name=s, shard_lengths=[20], num_bytes=0)
                   for s in ("train", "test")]
    builder.info.set_splits(tfds.core.SplitDict(split_infos))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    config = make_config("cifar10", str(tmp_path), batch_eval=6,
                         pp={"crop": 16, "inception_crop": True, "flip": True})
    with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path)):
        info = ip.get_dataset_info(config)
        train = next(iter(ip.train_dataset(config)))
        masks = [b["mask"] for b in ip.eval_dataset(config)]
    assert info.num_classes == 10 and len(info.label_names) == 10
    assert train["image"].shape == (8, 16, 16, 3) and train["label"].shape == (8, 10)
    assert np.concatenate(masks).sum() == 20 and len(masks) == 4


def test_normalisation_follows_the_given_statistics():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    white = ip.preprocess_for_eval(np.full((6, 6, 3), 255, np.uint8), 5, mean=mean, std=std)
    black = ip.preprocess_for_eval(np.zeros((6, 6, 3), np.uint8), 5, mean=mean, std=std)
    np.testing.assert_allclose(white[0, 0], (1 - np.array(mean)) / std, rtol=1e-6)
    np.testing.assert_allclose(black[0, 0], -np.array(mean) / std, rtol=1e-6)
    # (0.5, 0.5) is exactly the [-1, 1] of the published Mixer checkpoints
    pixels = np.random.default_rng(0).integers(0, 256, (6, 6, 3), np.uint8)
    np.testing.assert_array_equal(ip.preprocess_for_eval(pixels, 5, mean=(0.5,) * 3,
                                                         std=(0.5,) * 3),
                                  ip.preprocess_for_eval(pixels, 5))
