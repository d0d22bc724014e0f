"""Input pipeline: tfds datasets or image folders -> host-local batches in [-1, 1].

Sources (`config.dataset`):
- a tfds name (`cifar10`, `imagenet2012`, `oxford_iiit_pet`, ...) prepared in
  `config.tfds_data_dir`. Nothing is ever downloaded here: an unprepared
  dataset raises `DatasetNotPreparedError` saying how to build it, except that
  a manual-download dataset (imagenet2012) is built from
  `config.tfds_manual_dir` when that is set;
- a directory `{split}/<class>/<image file>` (class names sorted -> labels,
  any format PIL reads, any size, grey/RGBA converted to RGB). Every image is
  decoded once before training (the result is cached in `<dir>/.mixer_jax_images.json`,
  so later runs only check new or changed files): unreadable files are all listed
  in one `BadImagesError`, or skipped with a warning each if
  `config.skip_bad_images`. A folder with one class, a class with no training
  images, or empty class folders are reported too;
- `sklearn_digits`, the embedded default (see `mixer_jax.sklearn_digits`),
  built offline on first use.

Config keys read (vit_jax names; configs/ sets them, defaults in brackets):
  dataset                 tfds name or image directory
  tfds_data_dir           tfds data dir [tfds' default, ~/tensorflow_datasets]
  tfds_manual_dir         manual downloads, e.g. the ImageNet tars [None]
  pp.train, pp.test       split strings, tfds slicing syntax ("train[:90%]")
  pp.crop                 training / evaluation image side
  pp.resize               eval: shorter side before the centre crop; 0/None:
                          resize straight to crop [None]
  pp.inception_crop       train: random-area crop (5..100 %) [False]
  pp.flip                 train: random horizontal flip [False]
  pp.randaugment          train: None or (num_layers, magnitude) [None]
  batch, batch_eval       GLOBAL batch sizes; each host gets batch / hosts
                          [batch_eval: batch]
  shuffle_buffer          records in the shuffle buffer [10_000]. Encoded
                          records are buffered (ImageNet ~110 kB each, so
                          ~1 GB per host), never decoded images.
  seed                    data order and augmentation seed [0]
  skip_bad_images         image folders: train without unreadable files instead
                          of stopping [False]

Determinism and resuming: every host reads a fixed, disjoint slice of the
split. Epoch e is that slice shuffled with a seed from (seed, host, e);
example i of the host's endless stream gets its augmentation seed from
(seed, host, i). (Mixed-sample augmentation runs in the training step on the
devices, keyed by the step: `mixer_jax.mix`.) So
`train_dataset(config, start_step=k)` yields exactly the batches an
uninterrupted run yields from batch k on; it skips encoded records, which is
cheap, before any decoding. (tf.data's shuffle also mixes in TF's global seed:
a program that calls `tf.random.set_seed` must call it the same way on resume.)
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import json
import math
import operator
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mixer_jax import augment
from mixer_jax import sklearn_digits
from mixer_jax.errors import UserError

# TF only feeds data: keep it off GPUs so it never takes accelerator memory from JAX.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF's devices were initialised before this import; nothing to do
    pass

DEFAULT_SHUFFLE_BUFFER = 10_000
_FOLDER_ORDER_SEED = 0  # fixed order of a folder's files: slices never depend on config.seed
_NATIVE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp")
# Purposes mixed into every seed so that the random streams never overlap.
_SHUFFLE, _EXAMPLE = 1, 2

Range = tuple[str, int, int]  # (split name, first index, end index)


class DatasetNotPreparedError(UserError, FileNotFoundError):
    """The dataset is neither a prepared tfds dataset nor an image directory."""


class BadImagesError(UserError, ValueError):
    """An image folder holds unreadable files, or classes that cannot be trained."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Sizes and labels of the configured dataset (whole splits, all hosts)."""

    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    label_names: list[str] | None


@dataclasses.dataclass(frozen=True)
class _Source:
    """A dataset reduced to what the pipeline needs.

    `read(ranges)` gives records {'image': encoded bytes or file path,
    'label': int64} in a fixed order; `decode(record_image)` gives a uint8
    RGB image [H, W, 3].
    """

    name: str
    label_names: list[str] | None
    num_classes: int
    split_infos: Mapping[str, Any]
    read: Callable[[Sequence[Range]], tf.data.Dataset]
    decode: Callable[[tf.Tensor], tf.Tensor]
    class_counts: Mapping[str, Mapping[str, int]] | None = None  # folders: split -> class -> n


# --- Public API -------------------------------------------------------------


def get_dataset_info(config) -> DatasetInfo:
    """Number of classes, split sizes (`pp.train`, `pp.test`) and label names."""
    source = _open_source(config)
    pp = _require(config, "pp")
    if source.class_counts is not None:
        _check_folder_classes(source, _require(pp, "train"))
    return DatasetInfo(
        num_classes=source.num_classes,
        num_train_examples=_count(_resolve_split(source, _require(pp, "train"))),
        num_eval_examples=_count(_resolve_split(source, _require(pp, "test"))),
        label_names=source.label_names,
    )


def train_dataset(
    config,
    *,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tf.data.Dataset:
    """Endless host-local training batches, starting at batch `start_step`.

    Batches are {'image': float32 [batch / hosts, crop, crop, 3] in [-1, 1],
    'label': float32 [batch / hosts, num_classes]} (one-hot).
    `process_index`/`process_count` default to jax's.
    """
    process_index, process_count = _process(process_index, process_count)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    source = _open_source(config)
    pp = _require(config, "pp")
    batch = _host_batch(_require(config, "batch"), process_count, "batch")
    crop = _crop(pp)
    ranges = _host_ranges(
        _resolve_split(source, _require(pp, "train")), process_index, process_count,
        drop_remainder=True,  # equal shards: every host's epochs stay in step
    )
    num_examples = _count(ranges)
    if num_examples == 0:
        raise ValueError(
            f"Split {pp.get('train')!r} of {source.name!r} has too few examples for "
            f"{process_count} hosts."
        )
    randaugment = _randaugment_args(pp)
    buffer = int(config.get("shuffle_buffer") or DEFAULT_SHUFFLE_BUFFER)
    base_seed = _base_seed(int(config.get("seed") or 0), process_index)
    records = source.read(ranges)

    def epoch_records(epoch):
        shuffle_seed = tf.random.stateless_uniform(
            [], seed=_fold(base_seed, _SHUFFLE, epoch), minval=None, maxval=None, dtype=tf.int64
        )
        shuffled = records.shuffle(
            min(buffer, num_examples), seed=shuffle_seed, reshuffle_each_iteration=False
        )
        # Index in the host's endless stream: the key of the example's augmentation.
        return shuffled.enumerate(start=epoch * num_examples)

    start_epoch, offset = divmod(start_step * batch, num_examples)
    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_records)
    ds = ds.skip(offset)  # still encoded records: cheap

    @tf.autograph.experimental.do_not_convert  # plain TF ops: skip slow autograph
    def make_example(index, record):
        seed = _fold(base_seed, _EXAMPLE, index)
        image = preprocess_for_train(
            source.decode(record["image"]), seed, crop=crop,
            inception_crop=bool(pp.get("inception_crop")), flip=bool(pp.get("flip")),
            randaugment=randaugment,
        )
        return {"image": image, "label": tf.one_hot(record["label"], source.num_classes)}

    ds = ds.map(make_example, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_dataset(
    config,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tf.data.Dataset:
    """Finite host-local eval batches covering the split exactly once over all hosts.

    Batches are {'image', 'label' (one-hot float32), 'mask'}; the last batches
    are padded with zero images whose mask is 0, so every host yields the same
    number of full batches (`len(ds)` gives it).
    """
    process_index, process_count = _process(process_index, process_count)
    source = _open_source(config)
    pp = _require(config, "pp")
    batch = _host_batch(config.get("batch_eval") or _require(config, "batch"), process_count,
                        "batch_eval")
    crop, resize = _crop(pp), pp.get("resize") or None
    split_ranges = _resolve_split(source, _require(pp, "test"))
    total = _count(split_ranges)
    if total == 0:
        raise ValueError(f"Split {pp.get('test')!r} of {source.name!r} is empty.")
    ranges = _host_ranges(split_ranges, process_index, process_count, drop_remainder=False)
    num_batches = math.ceil(math.ceil(total / process_count) / batch)

    @tf.autograph.experimental.do_not_convert
    def make_example(record):
        return {
            "image": preprocess_for_eval(source.decode(record["image"]), crop, resize),
            "label": tf.one_hot(record["label"], source.num_classes),
            "mask": tf.constant(1.0),
        }

    ds = source.read(ranges).map(make_example, num_parallel_calls=tf.data.AUTOTUNE)
    padding = {
        "image": tf.zeros([crop, crop, 3]),
        "label": tf.zeros([source.num_classes]),
        "mask": tf.constant(0.0),
    }
    num_padding = num_batches * batch - _count(ranges)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
    ds = ds.batch(batch, drop_remainder=True)
    ds = ds.apply(tf.data.experimental.assert_cardinality(num_batches))
    return ds.prefetch(tf.data.AUTOTUNE)


def preprocess_for_eval(image, crop: int, resize: int | None = None) -> tf.Tensor:
    """One uint8 image [H, W] or [H, W, C] (C = 1..4) -> float32 [crop, crop, 3] in [-1, 1].

    With `resize`, the shorter side is resized to `resize` and the centre
    `crop` x `crop` cut out (the paper: 256 then 224); otherwise the whole
    image is resized to `crop` x `crop`.
    """
    if resize and resize < crop:
        raise ValueError(f"The eval resize ({resize}) must be >= the crop ({crop}).")
    image = to_rgb(image)
    if resize:
        image = _resize_shorter_side(image, resize)
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        image = tf.image.crop_to_bounding_box(
            image, (height - crop) // 2, (width - crop) // 2, crop, crop
        )
    else:
        image = _resize(image, [crop, crop])
    return _normalize(image)


def preprocess_for_train(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    crop: int,
    inception_crop: bool = False,
    flip: bool = False,
    randaugment: tuple[int, float] | None = None,
) -> tf.Tensor:
    """One uint8 RGB image -> augmented float32 [crop, crop, 3] in [-1, 1].

    Inception crop (else the whole image), resize to `crop`, flip, RandAugment;
    every random choice derives from `seed` (shape [2] int).
    """
    crop_seed, flip_seed, randaugment_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3)
    )
    if inception_crop:
        image = augment.inception_crop(image, crop_seed)
    image = _resize(image, [crop, crop])
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if randaugment:
        num_layers, magnitude = randaugment
        image = augment.randaugment(augment.to_uint8(image), randaugment_seed, num_layers,
                                    magnitude)
    return _normalize(image)


def to_rgb(image) -> tf.Tensor:
    """uint8 [H, W] or [H, W, C]: grey (+alpha) repeated to RGB, alpha dropped."""
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        raise ValueError(f"Expected a uint8 image, got {image.dtype}.")
    if image.shape.rank == 2:
        image = image[..., None]
    if image.shape.rank != 3:
        raise ValueError(f"Expected an image [H, W] or [H, W, C], got shape {image.shape}.")
    grey = tf.shape(image)[-1] < 3  # 1: grey, 2: grey + alpha
    channels = tf.where(grey, tf.constant([0, 0, 0]), tf.constant([0, 1, 2]))
    return tf.ensure_shape(tf.gather(image, channels, axis=-1), [None, None, 3])


# --- Image ops ----------------------------------------------------------------


def _resize(image: tf.Tensor, size) -> tf.Tensor:
    return tf.image.resize(image, size, method="bilinear", antialias=True)


def _resize_shorter_side(image: tf.Tensor, side: int) -> tf.Tensor:
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = side / tf.reduce_min(shape)
    size = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), side)
    return _resize(image, size)


def _normalize(image: tf.Tensor) -> tf.Tensor:
    """0..255 -> [-1, 1], the range every published checkpoint expects."""
    return tf.clip_by_value(tf.cast(image, tf.float32) / 127.5 - 1.0, -1.0, 1.0)


# --- Seeds, hosts, splits -------------------------------------------------------


def _base_seed(seed: int, process_index: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(
        tf.constant([seed, 0], tf.int64), tf.constant(process_index, tf.int64)
    )


def _fold(seed: tf.Tensor, *data) -> tf.Tensor:
    for value in data:
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(value, tf.int64))
    return seed


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count}).")
    return index, count


def _host_batch(global_batch: int, process_count: int, key: str) -> int:
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(
            f"config.{key} ({global_batch}) must be a positive multiple of the number of "
            f"hosts ({process_count}): it is the global batch, split over hosts."
        )
    return global_batch // process_count


def _resolve_split(source: _Source, spec: str) -> list[Range]:
    """tfds split syntax ('train', 'train[:90%]', 'train+test') -> absolute ranges."""
    try:
        instructions = tfds.core.ReadInstruction.from_spec(spec).to_absolute(source.split_infos)
    except (ValueError, KeyError, AssertionError) as e:
        raise ValueError(
            f"Bad split {spec!r} for dataset {source.name!r} (splits: "
            f"{sorted(source.split_infos)}): {e}"
        ) from e
    # tfds marks open ends with None.
    return [
        (i.splitname, i.from_ or 0,
         source.split_infos[i.splitname].num_examples if i.to is None else i.to)
        for i in instructions
    ]


def _count(ranges: Sequence[Range]) -> int:
    return sum(end - start for _, start, end in ranges)


def _host_ranges(
    ranges: Sequence[Range], process_index: int, process_count: int, drop_remainder: bool
) -> list[Range]:
    """This host's contiguous share of the concatenated ranges.

    Shares differ by at most one example, or are equal (dropping up to
    `process_count - 1` examples) with `drop_remainder`.
    """
    total = _count(ranges)
    if drop_remainder:
        share = total // process_count
        lo, hi = process_index * share, (process_index + 1) * share
    else:
        lo = process_index * total // process_count
        hi = (process_index + 1) * total // process_count
    out, position = [], 0
    for name, start, end in ranges:
        first, last = max(lo, position), min(hi, position + end - start)
        if first < last:
            out.append((name, start + first - position, start + last - position))
        position += end - start
    return out


def _require(config, key: str):
    value = config.get(key)
    if value is None:
        raise ValueError(f"The config needs {key!r} (see mixer_jax/input_pipeline.py).")
    return value


def _crop(pp) -> int:
    crop = int(_require(pp, "crop"))
    if crop <= 0:
        raise ValueError(f"pp.crop must be positive, got {crop}.")
    return crop


def _randaugment_args(pp) -> tuple[int, float] | None:
    value = pp.get("randaugment")
    if not value:
        return None
    if len(value) != 2:
        raise ValueError(f"pp.randaugment must be None or (num_layers, magnitude), got {value}.")
    return int(value[0]), float(value[1])


# --- Sources --------------------------------------------------------------------


def _open_source(config) -> _Source:
    dataset = _require(config, "dataset")
    return _cached_source(
        str(dataset), config.get("tfds_data_dir") or None, config.get("tfds_manual_dir") or None,
        bool(config.get("skip_bad_images")),
    )


@functools.lru_cache(maxsize=16)
def _cached_source(dataset: str, data_dir: str | None, manual_dir: str | None,
                   skip_bad_images: bool = False) -> _Source:
    if tf.io.gfile.isdir(dataset):
        return _folder_source(dataset, skip_bad_images=skip_bad_images)
    return _tfds_source(dataset, data_dir, manual_dir)


def _tfds_source(name: str, data_dir: str | None, manual_dir: str | None) -> _Source:
    builder = _prepared_builder(name, data_dir, manual_dir)
    features = builder.info.features
    if "image" not in features or "label" not in features:
        raise ValueError(
            f"tfds dataset {name!r} has features {list(features)}; mixer_jax needs "
            "'image' and 'label' (an image-classification dataset)."
        )
    label = features["label"]
    if not isinstance(label, tfds.features.ClassLabel):
        raise ValueError(f"tfds dataset {name!r}: 'label' is not a ClassLabel.")

    def read(ranges: Sequence[Range]) -> tf.data.Dataset:
        # Empty ranges (a host with no eval examples): an empty read of split 0.
        parts = ranges or [(next(iter(builder.info.splits)), 0, 1)]
        split = functools.reduce(
            operator.add,
            [tfds.core.ReadInstruction(n, from_=a, to=b, unit="abs") for n, a, b in parts],
        )
        ds = builder.as_dataset(
            split=split, shuffle_files=False,  # fixed order; shuffled per epoch later
            decoders={"image": tfds.decode.SkipDecoding()},
        )
        ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
        return ds if ranges else ds.take(0)

    def decode(encoded: tf.Tensor) -> tf.Tensor:
        return to_rgb(features["image"].decode_example(encoded))

    return _Source(
        name=name, label_names=list(label.names), num_classes=label.num_classes,
        split_infos=builder.info.splits, read=read, decode=decode,
    )


def _prepared_builder(name: str, data_dir: str | None, manual_dir: str | None):
    """A prepared tfds builder; raises DatasetNotPreparedError, never downloads."""
    if name == sklearn_digits.NAME:
        return sklearn_digits.prepare(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except ValueError as e:  # DatasetNotFoundError, or not even a valid name
        raise DatasetNotPreparedError(
            f"Dataset {name!r} is neither a directory of images nor a tfds dataset name "
            f"({type(e).__name__}: {str(e).splitlines()[0]})."
        ) from None
    if builder.is_prepared():
        return builder
    root = os.fspath(builder.data_dir_root)
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    how = f"Prepare it once (it may take a while) with:\n  tfds build {name} --data_dir={root}"
    if instructions:
        how = (
            f"{name} needs files you download yourself:\n{instructions.strip()}\n"
            f"Put them in a directory DIR, then set config.tfds_manual_dir=DIR, or run:\n"
            f"  tfds build {name} --data_dir={root} --manual_dir=DIR"
        )
    message = (
        f"Dataset {name!r} (version {builder.version}) is not prepared in the tfds data "
        f"dir {root} (set config.tfds_data_dir to use another). mixer_jax never downloads "
        f"data while training. {how}"
    )
    if not (instructions and manual_dir):
        raise DatasetNotPreparedError(message)
    logging.info("Building %s from the manual files in %s", name, manual_dir)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=manual_dir, try_download_gcs=False
            )
        )
    except Exception as e:  # Report the build failure with the how-to above.
        raise DatasetNotPreparedError(
            f"{message}\nBuilding it from tfds_manual_dir={manual_dir} failed: {e}"
        ) from e
    return tfds.builder(name, data_dir=data_dir)


def _folder_source(root: str, *, skip_bad_images: bool = False) -> _Source:
    """`root/{split}/<class>/<file>` -> a source; labels are sorted class names."""
    readable = _readable_extensions()
    by_class: dict[str, dict[str, list[str]]] = {}  # split -> class -> image paths
    skipped = []
    for split in sorted(d for d in tf.io.gfile.listdir(root) if _isdir(root, d)):
        by_class[split] = {}
        for cls in sorted(c for c in tf.io.gfile.listdir(os.path.join(root, split))
                          if _isdir(root, split, c)):
            paths = by_class[split][cls] = []
            for name in sorted(tf.io.gfile.listdir(os.path.join(root, split, cls))):
                path = os.path.join(root, split, cls, name)
                if os.path.splitext(name)[1].lower() in readable:
                    paths.append(path)
                elif not name.startswith("."):
                    skipped.append(path)
    if skipped:
        logging.warning("%s: skipped %d files that are not images, e.g. %s",
                        root, len(skipped), skipped[0])
    bad = _unreadable_images(root, [p for split in by_class.values()
                                    for paths in split.values() for p in paths])
    if bad:
        listing = [f"{path}: {why}" for path, why in sorted(bad.items())]
        if not skip_bad_images:
            shown = listing[:_BAD_IMAGES_SHOWN] + (
                [f"... and {len(listing) - _BAD_IMAGES_SHOWN} more"]
                if len(listing) > _BAD_IMAGES_SHOWN else [])
            raise BadImagesError(
                f"Image directory {root} has {len(bad)} unreadable image file(s); fix or remove "
                "them, or set config.skip_bad_images=True to train without them:\n  "
                + "\n  ".join(shown))
        for line in listing:
            logging.warning("Skipping unreadable image %s", line)
        by_class = {split: {cls: [p for p in paths if p not in bad]
                            for cls, paths in classes.items()} for split, classes in by_class.items()}
    empty = [os.path.join(root, split, cls) for split, classes in by_class.items()
             for cls, paths in classes.items() if not paths]
    if empty:
        logging.warning("%s: %d class folder(s) hold no images and are ignored: %s", root,
                        len(empty), ", ".join(empty))
    classes = sorted({cls for split in by_class.values() for cls, paths in split.items() if paths})
    if not classes:
        raise DatasetNotPreparedError(
            f"Image directory {root} holds no images; expected {root}/<split>/<class>/<file>."
        )
    label_of = {cls: label for label, cls in enumerate(classes)}
    examples: dict[str, list[tuple[str, int]]] = {}  # split -> (path, label)
    for split, paths_by_class in by_class.items():
        ordered = [(p, label_of[c]) for c, paths in paths_by_class.items() for p in paths]
        # Class-sorted files would defeat a small shuffle buffer: fix a random order.
        order = np.random.RandomState(_FOLDER_ORDER_SEED).permutation(len(ordered))
        examples[split] = [ordered[i] for i in order]

    def read(ranges: Sequence[Range]) -> tf.data.Dataset:
        chosen = [ex for split, start, end in ranges for ex in examples[split][start:end]]
        return tf.data.Dataset.from_tensor_slices({
            "image": tf.constant([path for path, _ in chosen], tf.string),
            "label": tf.constant([label for _, label in chosen], tf.int64),
        })

    split_infos = {
        split: tfds.core.SplitInfo(name=split, shard_lengths=[len(ex)], num_bytes=0)
        for split, ex in examples.items()
    }
    return _Source(
        name=root, label_names=classes, num_classes=len(classes),
        split_infos=split_infos, read=read, decode=_decode_file,
        class_counts={split: {cls: len(paths) for cls, paths in classes_.items() if paths}
                      for split, classes_ in by_class.items()},
    )


_BAD_IMAGES_SHOWN = 20
IMAGE_CHECK_CACHE = ".mixer_jax_images.json"


def _unreadable_images(root: str, paths: list[str]) -> dict[str, str]:
    """{path: why} of the files that do not decode; each file is decoded once per change.

    Results are cached in `<root>/.mixer_jax_images.json`, keyed by size and mtime (a
    read-only folder is simply checked again next time). Folders on object stores
    (gs://) are not checked: reading every file there once more would be slow.
    """
    if "://" in root:
        return {}
    cache_path = os.path.join(root, IMAGE_CHECK_CACHE)
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    stats = {path: _file_stamp(path) for path in paths}
    todo = [p for p in paths if cache.get(os.path.relpath(p, root), [None])[:2] != stats[p]]
    if todo:
        logging.info("Checking %d images in %s (once; the result is cached).", len(todo), root)
        with concurrent.futures.ThreadPoolExecutor(min(16, (os.cpu_count() or 1) * 2)) as pool:
            for path, problem in zip(todo, pool.map(_image_problem, todo)):
                cache[os.path.relpath(path, root)] = [*stats[path], problem]
        try:
            temporary = f"{cache_path}.tmp-{os.getpid()}"
            with open(temporary, "w") as f:
                json.dump(cache, f)
            os.replace(temporary, cache_path)
        except OSError as e:
            logging.info("Could not cache the image check in %s (%s).", cache_path, e)
    return {p: cache[os.path.relpath(p, root)][2] for p in paths
            if cache[os.path.relpath(p, root)][2] is not None}


def _file_stamp(path: str) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def _image_problem(path: str) -> str | None:
    """Why `path` cannot be decoded, or None."""
    from PIL import Image, UnidentifiedImageError

    if os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: truncated or corrupt data fails here
    except UnidentifiedImageError:
        return "not an image file (unrecognised content)"
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for corrupt data
        return f"corrupt image ({e})"
    return None


def _check_folder_classes(source: _Source, train_spec: str) -> None:
    """A folder must have two classes or more, each with training images."""
    root, counts = source.name, source.class_counts
    if source.num_classes < 2:
        raise BadImagesError(
            f"Image directory {root} has a single class ({source.label_names[0]!r}); a classifier "
            f"needs two or more: put each class's images in {root}/<split>/<class>/.")
    train_splits = {name for name, _, _ in _resolve_split(source, train_spec)}
    trained = {cls for split in train_splits for cls in counts.get(split, {})}
    untrained = {cls: sorted(s for s, classes in counts.items() if cls in classes)
                 for cls in source.label_names if cls not in trained}
    if untrained:
        raise BadImagesError(
            f"Image directory {root}: class(es) "
            + ", ".join(f"{cls!r} (only in {'/'.join(splits)}/)" for cls, splits in
                        sorted(untrained.items()))
            + f" have no images in the training split {train_spec!r}; the model could never "
            "predict them. Add training images or remove those folders.")


def _isdir(*parts: str) -> bool:
    return tf.io.gfile.isdir(os.path.join(*parts))


def _readable_extensions() -> set[str]:
    from PIL import Image

    Image.init()
    pil = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return pil | set(_NATIVE_EXTENSIONS)


def _decode_file(path: tf.Tensor) -> tf.Tensor:
    """Reads and decodes one image file: TF decoders when they can, else PIL."""
    data = tf.io.read_file(path)
    native = tf.strings.regex_full_match(
        tf.strings.lower(path), r".*\.(" + "|".join(e[1:] for e in _NATIVE_EXTENSIONS) + ")"
    )
    image = tf.cond(
        native,
        lambda: tf.io.decode_image(data, channels=0, expand_animations=False),
        lambda: tf.numpy_function(_decode_with_pil, [data], tf.uint8, stateful=False),
    )
    return to_rgb(tf.ensure_shape(image, [None, None, None]))


def _decode_with_pil(data) -> np.ndarray:
    from PIL import Image

    # numpy_function hands a scalar string over as a 0-d object array.
    with Image.open(io.BytesIO(np.asarray(data).item())) as image:
        return np.asarray(image.convert("RGB"))
