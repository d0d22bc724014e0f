"""What the notebooks need to run anywhere: a checkpoint, the config files, and small mode.

A notebook uses a published checkpoint (`gs://mixer_models/...`, fetched over HTTPS)
when the runtime can reach it, and otherwise Mixer-Ti/4 trained on the embedded
digits with the shipped `default` config (about a minute on a CPU), trained once and
shared by the notebooks through `cache_dir()`. Everything here works from a plain
`pip install` (the configs ship inside the package).

Small mode (`MIXER_JAX_NOTEBOOK_SMALL=1`, set by the test suite) forces the offline
path and tiny step counts, so every notebook runs top to bottom in seconds.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import shutil
import tempfile
import threading
import urllib.parse
import urllib.request

import ml_collections
import numpy as np
from absl import logging

from mixer_jax import cli

SMALL_ENV = "MIXER_JAX_NOTEBOOK_SMALL"
CACHE_ENV = "MIXER_JAX_NOTEBOOK_DIR"
DIGITS_MODEL = "Mixer-Ti_4"
_GCS_HTTPS = "https://storage.googleapis.com/"


def small_mode() -> bool:
    """True when the notebooks must run offline with tiny step counts (the tests)."""
    return os.environ.get(SMALL_ENV, "") not in ("", "0")


def cache_dir() -> pathlib.Path:
    """Where notebooks keep downloads and trained models: $MIXER_JAX_NOTEBOOK_DIR or a temp dir."""
    path = pathlib.Path(os.environ.get(CACHE_ENV) or
                        os.path.join(tempfile.gettempdir(), "mixer_jax_notebooks"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """A shipped config (`configs/<name>.py`, installed with the package), as
    `--config=<name>[:arg]` gives it."""
    from mixer_jax import train_config

    path = train_config.config_path(name)
    spec = importlib.util.spec_from_file_location(f"mixer_jax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def https_url(path: str) -> str:
    """gs://bucket/file -> its public HTTPS address (other addresses are returned as they are)."""
    if path.startswith("gs://"):
        return _GCS_HTTPS + path[len("gs://"):]
    return path


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether `url` (http(s) or gs://) answers a HEAD request within `timeout` seconds.

    Never blocks longer: the request (name lookup included, which has no timeout of its
    own) runs in a daemon thread that is abandoned when the time is up.
    """
    answered = []

    def head():
        try:
            request = urllib.request.Request(https_url(url), method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answered.append(response.status < 400)
        except (OSError, ValueError):
            answered.append(False)

    thread = threading.Thread(target=head, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


def fetch(url: str, directory: str | os.PathLike | None = None) -> pathlib.Path:
    """A local copy of `url` (http(s) or gs://), downloaded once into `directory`.

    Local paths are returned as they are. The download goes to a temporary name and is
    renamed when complete, so an interrupted download is never taken for a file.
    """
    if urllib.parse.urlparse(url).scheme not in ("http", "https", "gs"):
        return pathlib.Path(url)
    directory = pathlib.Path(directory or cache_dir())
    name = urllib.parse.urlparse(https_url(url)).path.strip("/").replace("/", "_")
    target = directory / name
    if not target.exists():
        print(f"Downloading {url} to {target} ...", flush=True)
        partial = target.with_name(target.name + ".partial")
        urllib.request.urlretrieve(https_url(url), partial)
        partial.rename(target)
    return target


def digits_checkpoint(total_steps: int | None = None) -> pathlib.Path:
    """Mixer-Ti/4 trained on the embedded digits (shipped `default` config), as a published npz.

    Trained the first time only (its training run resumes if it was interrupted);
    `total_steps` defaults to the config's (200) or 20 in small mode.
    """
    from mixer_jax import convert, train

    config = load_config("default")
    if total_steps is None:
        total_steps = 20 if small_mode() else config.total_steps
    config.total_steps = total_steps
    config.warmup_steps = min(config.warmup_steps, total_steps // 4)
    config.eval_every = config.checkpoint_every = total_steps
    config.progress_every = max(1, min(config.progress_every, total_steps // 2))
    target = cache_dir() / f"{DIGITS_MODEL}_digits_{total_steps}steps.npz"
    if target.exists():
        return target
    print(f"Training {DIGITS_MODEL} on the embedded digits for {total_steps} steps ...", flush=True)
    workdir = cache_dir() / target.stem
    with training_progress():
        final = train.train_and_evaluate(config, str(workdir))
    print(f"Test accuracy {final['eval_top1']:.1%} after {final['step']} steps.")
    return pathlib.Path(convert.orbax_to_npz(str(workdir), str(target)))


def digits_folder(*, invert: bool = True) -> pathlib.Path:
    """The embedded digits as an image folder `{train,test}/<digit>/<n>.png`, written once.

    The folder layout is the one `config.dataset` takes for your own images. With
    `invert`, dark ink on light paper (the embedded digits are light on dark).
    """
    from PIL import Image

    from mixer_jax import sklearn_digits

    root = cache_dir() / ("digits_folder_inverted" if invert else "digits_folder")
    if root.is_dir():
        return root
    partial = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=cache_dir()))
    builder = sklearn_digits.prepare()
    for split in ("train", "test"):
        for i, example in enumerate(builder.as_dataset(split=split).as_numpy_iterator()):
            image = 255 - example["image"] if invert else example["image"]
            path = partial / split / str(example["label"]) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(image, np.uint8)).save(path)
    try:
        partial.rename(root)  # complete or absent, even when interrupted
    except OSError:  # written meanwhile by another process
        shutil.rmtree(partial, ignore_errors=True)
    return root


@contextlib.contextmanager
def training_progress():
    """Shows the training loop's progress (absl INFO lines, a live bar in notebooks) inside
    the `with` block; other libraries' warnings only."""
    verbosity, only_ours = logging.get_verbosity(), cli.OURS_OR_WARNINGS
    logging.set_verbosity(logging.INFO)
    logging.get_absl_logger().addFilter(only_ours)
    try:
        yield
    finally:
        logging.get_absl_logger().removeFilter(only_ours)
        logging.set_verbosity(verbosity)
