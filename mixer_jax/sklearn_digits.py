"""The embedded default dataset: scikit-learn's handwritten digits as a tfds dataset.

`sklearn_digits` holds the 1797 real 8x8 digit images bundled with
scikit-learn (UCI "Optical Recognition of Handwritten Digits", test part), so
the project can train and evaluate with no download. It is an ordinary tfds
`GeneratorBasedBuilder`, so it flows through exactly the same pipeline as
cifar10 or imagenet2012.

- image: uint8 RGB, 8x8x3 (the 0..16 grey levels scaled to 0..255, repeated
  over the three channels, as the published checkpoints expect RGB input);
- label: `ClassLabel` with names '0'..'9';
- splits: train 1437 / test 360, a fixed permutation (seed 0) of the 1797
  images, the same on every machine.

Importing this module registers the builder with tfds. `prepare()` builds it
into a tfds data dir in about a second (no network), safely when several
processes start at once. From the command line:
`tfds build sklearn_digits --imports=mixer_jax.sklearn_digits --data_dir=DIR`.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

NAME = "sklearn_digits"
NUM_IMAGES = 1797
NUM_TRAIN = 1437  # 80 % of the images; the other 360 are the test split.
_SPLIT_SEED = 0
_MAX_GREY = 16  # sklearn stores the digits as counts 0..16


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits (10 classes), fixed 1437/360 split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # tfds 4.9 finds a builder's source through `importlib_resources`, which it
    # does not install on Python >= 3.9; naming the file directly avoids that.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="scikit-learn's bundled 8x8 handwritten digits as RGB images.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 3)),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    # tfds prints "Downloading and preparing dataset ..." and "... downloaded": nothing is
    # downloaded here, and the build takes a second, so one log line says what happens.
    def _log_download_bytes(self) -> None:
        logging.info("Building the embedded %s dataset (no download, about a second).", NAME)

    def _log_download_done(self) -> None:
        pass

    def _split_generators(self, dl_manager):
        del dl_manager  # The data ships with scikit-learn: nothing to download.
        order = _split_order()
        return {
            "train": self._generate_examples(order[:NUM_TRAIN]),
            "test": self._generate_examples(order[NUM_TRAIN:]),
        }

    def _generate_examples(self, indices):
        images, labels = _load_digits()
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 RGB [1797, 8, 8, 3] and their int labels."""
    from sklearn.datasets import load_digits  # Imported lazily: only needed to build.

    digits = load_digits()
    grey = np.round(digits.images * (255.0 / _MAX_GREY)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), digits.target


def _split_order() -> np.ndarray:
    """Fixed permutation of the image indices: first NUM_TRAIN train, rest test."""
    return np.random.RandomState(_SPLIT_SEED).permutation(NUM_IMAGES)


@contextlib.contextmanager
def _no_progress_bars():
    """tfds' build progress bars (a second's worth of them) off, then as they were."""
    was_active = getattr(tfds.core.utils.tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(was_active)


def prepare(data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Returns the prepared `sklearn_digits` builder, building it first if needed.

    Local data dirs are built in a private temporary directory and moved into
    place with one atomic rename, so processes starting together (multi-host
    tests) never see or leave a half-written dataset; the losers of the race
    discard their copy.
    """
    builder = SklearnDigits(data_dir=data_dir)
    if builder.is_prepared():
        return builder
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    root = os.fspath(builder.data_dir_root)
    if "://" in root:  # Remote storage has no atomic rename; rely on tfds' own.
        builder.download_and_prepare(download_config=config)
        return builder
    os.makedirs(root, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix=f".{NAME}-build-", dir=root)
    try:
        tmp_builder = SklearnDigits(data_dir=tmp_root)
        with _no_progress_bars():
            tmp_builder.download_and_prepare(download_config=config)
        target = os.fspath(builder.data_path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.rename(os.fspath(tmp_builder.data_path), target)
        except OSError:
            # Another process renamed its copy first; theirs is as good as ours.
            if not SklearnDigits(data_dir=data_dir).is_prepared():
                raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    # A fresh builder: the first one read its (empty) metadata before the build.
    return SklearnDigits(data_dir=data_dir)
