"""Training under faults: corrupt checkpoints, signals, two runs on one workdir, a full disk."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mixer_jax import metric_writers, train, train_checkpoint, workdir_lock
from test_train import assert_trees_equal, flat, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
           JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def fault_config(data_dir, **changes):
    """30 steps, checkpoints at 10, 20, 30 (all three kept), eval only at the end."""
    return tiny_config(data_dir, keep_checkpoints=3, **changes)


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory, data_dir):
    """An uninterrupted run: (workdir, its final parameters)."""
    workdir = tmp_path_factory.mktemp("three")
    train.train_and_evaluate(fault_config(data_dir), str(workdir))
    assert train_checkpoint.TrainCheckpointer(str(workdir)).all_steps() == [10, 20, 30]
    return workdir, flat(train_checkpoint.restore_params(str(workdir)))


def _data_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest array data file of the step's parameters."""
    return max((p for p in (step_dir / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _flip_bit(path: pathlib.Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "deleted manifest": lambda d: (d / "params" / "manifest.ocdbt").unlink(),
    "truncated data file": lambda d: os.truncate(_data_file(d), _data_file(d).stat().st_size // 2),
    "flipped bit": lambda d: _flip_bit(_data_file(d)),
    "deleted train": lambda d: shutil.rmtree(d / "train"),
    "garbage metadata": lambda d: (d / "meta" / "metadata").write_bytes(b"\x00garbage{"),
}
EXPECTED_FILE = {"deleted manifest": "params/manifest.ocdbt", "truncated data file": "params/",
                 "flipped bit": "params/", "deleted train": "train/",
                 "garbage metadata": "meta/metadata"}


@pytest.mark.slow
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(
        corruption, three_checkpoints, data_dir, tmp_path, caplog):
    source, reference = three_checkpoints
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    CORRUPTIONS[corruption](workdir / "checkpoints" / "30")

    with caplog.at_level("WARNING"):
        final = train.train_and_evaluate(fault_config(data_dir), str(workdir))

    warning = next(r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage())
    assert "step 30" in warning and EXPECTED_FILE[corruption] in warning
    assert (workdir / "corrupt_checkpoints" / "30").is_dir()  # moved aside, not deleted
    assert final["step"] == 30
    # Retrained from step 20: the same parameters as the uninterrupted run, bit for bit.
    assert_trees_equal(flat(train_checkpoint.restore_params(str(workdir))), reference)
    assert [r["step"] for r in metric_writers.read_metrics(str(workdir)) if "loss" in r] == [
        5, 10, 15, 20, 25, 30]


def test_verify_step_names_the_bad_file_for_every_corruption(three_checkpoints, tmp_path):
    source, _ = three_checkpoints
    assert train_checkpoint.verify_step(source / "checkpoints" / "30") is None
    for corruption, corrupt in CORRUPTIONS.items():
        step_dir = tmp_path / corruption / "30"
        shutil.copytree(source / "checkpoints" / "30", step_dir)
        corrupt(step_dir)
        problem = train_checkpoint.verify_step(step_dir)
        assert problem is not None and EXPECTED_FILE[corruption] in problem, (corruption, problem)


def test_no_good_checkpoint_stops_with_every_step_named(three_checkpoints, data_dir, tmp_path):
    source, _ = three_checkpoints
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    for step in (10, 20, 30):
        _flip_bit(_data_file(tmp_path / "checkpoints" / str(step)))
    with pytest.raises(train_checkpoint.CorruptCheckpointError,
                       match=r"No good checkpoint left .*step 30 .*step 20 .*step 10"):
        train.train_and_evaluate(fault_config(data_dir), str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "corrupt_checkpoints").iterdir()) == [
        "10", "20", "30"]


def test_restore_params_refuses_corrupt_and_non_finite_parameters(three_checkpoints, tmp_path):
    source, reference = three_checkpoints
    shutil.copytree(source / "checkpoints" / "30", tmp_path / "30")
    _flip_bit(_data_file(tmp_path / "30"))
    with pytest.raises(train_checkpoint.CorruptCheckpointError,
                       match=r"step 30 .* corrupt: .*params/.* SHA-256"):
        train_checkpoint.restore_params(str(tmp_path / "30"))

    bad = {k: v.copy() for k, v in reference.items()}
    bad["head/bias"][0] = np.nan
    train_checkpoint.save_params(train_checkpoint.traverse_util.unflatten_dict(bad, sep="/"),
                                 str(tmp_path / "nan"))
    with pytest.raises(train_checkpoint.CorruptCheckpointError,
                       match=r"'head/bias' holds NaN/Inf"):
        train_checkpoint.restore_params(str(tmp_path / "nan"))
