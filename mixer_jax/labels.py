"""Class names for predictions: ImageNet-1k, tfds datasets, image folders, text files.

`checkpoint_names(checkpoint, num_classes)`: the names a training run stored with its
checkpoints (folder names, tfds label names), else those `label_names(None, ...)` gives.

`label_names(source, num_classes)` resolves a `source`:
  None                       by class count: 1000 -> ImageNet-1k names; else none;
  "imagenet2012"/"imagenet1k" human-readable ImageNet-1k names (shipped inside
                             tensorflow-datasets, in the standard sorted-synset order
                             that the published checkpoints use);
  "imagenet21k"              not shipped by any installed package: pass a text file;
  a directory                image folder `{train,test}/<class>/...` (or `<class>/...`):
                             sorted class directory names, the training label order;
  a file                     one name per line, line i is class i;
  anything else              a tfds dataset name; its builder's `label` feature (read
                             from the builder's code and metadata, never downloaded).
"""
from __future__ import annotations

import os

from mixer_jax.errors import UserError

IMAGENET1K_CLASSES = 1000
IMAGENET21K_CLASSES = 21843
_IMAGENET1K_SOURCES = ("imagenet2012", "imagenet1k", "imagenet")


class LabelsError(UserError, ValueError):
    """Class names that cannot be had from the given source, explained."""


def imagenet1k_names() -> list[str]:
    """The 1000 ImageNet-1k class names, e.g. 'tench, Tinca tinca' for class 0."""
    # tfds' own imagenet2012 builder has synset ids only ('n01440764'); this
    # module of the same package carries the readable names in the same order.
    from tensorflow_datasets.datasets.siscore import labels

    names = list(labels.IMAGENET_LABELS_LIST)
    if len(names) != IMAGENET1K_CLASSES:
        raise RuntimeError(f"tensorflow-datasets' ImageNet-1k name list has {len(names)} "
                           f"entries, not {IMAGENET1K_CLASSES}; its layout changed.")
    return names


def folder_names(directory: str) -> list[str]:
    """Class names of an image folder: sorted subdirectories of `directory/train`
    (or of `directory` itself when it has no `train` subdirectory)."""
    root = os.path.join(directory, "train")
    root = root if os.path.isdir(root) else directory
    names = sorted(e.name for e in os.scandir(root)
                   if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise LabelsError(f"No class directories in {root!r}; expected "
                         f"{directory}/train/<class>/<image files>.")
    return names


def file_names(path: str) -> list[str]:
    """One class name per line (trailing whitespace and a final empty line dropped)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip() for line in f.read().rstrip("\n").split("\n")]
    except UnicodeDecodeError as e:
        raise LabelsError(f"Label file {path!r} is not UTF-8 text ({e.reason} at byte "
                          f"{e.start}); save it as UTF-8, one class name per line.") from None


def tfds_names(name: str, data_dir: str | None = None) -> list[str] | None:
    """Class names of a tfds dataset's `label` feature, without downloading anything.

    None when tfds knows no names beyond the class numbers: some datasets (cifar10,
    cifar100) get their names only when prepared in `data_dir`.
    """
    import tensorflow_datasets as tfds

    from mixer_jax import sklearn_digits  # registers the embedded digits dataset
    try:
        features = tfds.builder(name, data_dir=data_dir).info.features
    except Exception as e:  # tfds raises many types for unknown names
        raise LabelsError(f"Cannot get class names of tfds dataset {name!r}: {e}") from e
    label = features["label"] if "label" in features else None
    if label is None or not hasattr(label, "names"):
        raise LabelsError(f"tfds dataset {name!r} has no 'label' class feature.")
    names = list(label.names)
    if name == sklearn_digits.NAME:  # digits are their own names
        return names
    return None if names == [str(i) for i in range(len(names))] else names


def checkpoint_names(checkpoint: str, num_classes: int | None) -> list[str] | None:
    """The class names stored with a training run's checkpoint (`checkpoint`: its workdir,
    checkpoints, step or `params` directory), else `label_names(None, num_classes)`."""
    if os.path.isdir(checkpoint):
        from mixer_jax import train_checkpoint  # orbax: only for checkpoint directories

        path = os.path.dirname(checkpoint.rstrip(os.sep)) if (
            os.path.basename(checkpoint.rstrip(os.sep)) == "params") else checkpoint
        try:
            names = train_checkpoint.read_meta(path).get("class_names")
        except (FileNotFoundError, ValueError):
            names = None
        if names and len(names) == num_classes:
            return names
    return label_names(None, num_classes)


def label_names(source: str | None, num_classes: int | None, *,
                data_dir: str | None = None) -> list[str] | None:
    """Class names for a model with `num_classes` outputs (see the module docstring).

    Returns None when no names are known (no `source` and no known class count, or
    a tfds dataset whose names are only its class numbers). Raises ValueError when
    the source's class count differs from the model's.
    """
    if source is None:
        return imagenet1k_names() if num_classes == IMAGENET1K_CLASSES else None
    if source.lower() in _IMAGENET1K_SOURCES:
        names = imagenet1k_names()
    elif source.lower() == "imagenet21k":
        raise LabelsError("No installed package ships the ImageNet-21k class names; pass "
                         f"a text file with {IMAGENET21K_CLASSES} lines (class i on line i).")
    elif os.path.isdir(source):
        names = folder_names(source)
    elif os.path.isfile(source):
        names = file_names(source)
    elif os.sep in source or source.endswith(".txt"):
        raise LabelsError(f"Label file or folder {source!r} does not exist.")
    else:
        names = tfds_names(source, data_dir)
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise LabelsError(f"Label source {source!r} has {len(names)} classes but the model "
                         f"has {num_classes} outputs.")
    return names
