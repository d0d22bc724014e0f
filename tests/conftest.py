"""Test setup, done before jax is imported anywhere (subprocesses inherit it).

- 8 simulated CPU devices, for the pmap / mesh / FSDP tests.
- A persistent compilation cache: many tests and their subprocesses compile the
  same programs; a cached program is the same program, so results are unchanged.
"""
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "mixer_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# torch (test extra, for the timm parity tests) imports triton if installed, and
# triton's native library crashes the process when TensorFlow was loaded first.
# CPU torch never needs triton: make `import triton` fail (torch then skips it).
sys.modules.setdefault("triton", None)

import pathlib
import shutil
import subprocess
import sys

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def installed_package(tmp_path_factory):
    """A folder holding mixer_jax as a plain (non-editable) install of its wheel.

    The sources are copied first (setuptools builds in the source folder), then the wheel
    is built without build isolation (offline) and installed with `--target`; put the
    folder on PYTHONPATH and run from anywhere but the repository.
    """
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in ("mixer_jax", "configs"):
        shutil.copytree(_REPO / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(_REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"),
                    str(source)], check=True, timeout=600)
    (wheel,) = (root / "dist").glob("mixer_jax-*.whl")
    target = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=600)
    return target
