"""Families train through `mixer_jax.main` on the embedded digits (issues 10 and 11's
end-to-end check).

Each name runs the default digits recipe (configs/default.py: 16x16 images, Adam, 200
steps) with module-field overrides (`NAMES`; None: the family's `Family.tiny`, which must
give a model that takes 16x16 images) set in `config.model` by a config file written for
the test. Names whose family is not registered yet are skipped; they run as soon as their
family file lands.

The runs are separate programs and mostly single-threaded (imports, tracing, XLA's
compiles, tf.data), so the module starts every selected name's run at once, as many at a
time as there are cores, and each test waits for its own.
"""
import concurrent.futures
import os
import pathlib
import subprocess
import sys

import pytest

from mixer_jax import metric_writers, models

REPO = pathlib.Path(__file__).resolve().parents[1]
# name -> module-field overrides (None: the family's `Family.tiny`)
# (MLP-Mixer's own run is the README's main job, tested in test_cli.py.)
NAMES = {
    "resmlp_12_224": None,
    "gmlp_ti16_224": None,
    # timm's 7x7 stride-4 stem: a 4x4 map from the 16x16 digits (8x8 images upscaled),
    # one block per stage (`Family.tiny`'s stride-1 stem is for the registry's tiny inputs)
    "poolformer_s12": dict(dims=(32, 32, 64, 64), depths=(1, 1, 1, 1)),
    "convformer_s18": dict(dims=(32, 32, 64, 64), depths=(1, 1, 1, 1)),
}
TEST_NAME = "test_family_reaches_95_percent_on_digits"


def overrides(name: str) -> dict:
    """The run's `config.model` overrides; skips the test when there are none yet."""
    if name not in models.list_models():
        pytest.skip(f"{name} is not registered yet")
    found = NAMES[name] if NAMES[name] is not None else dict(models.get_family(name).tiny)
    if not found:
        pytest.skip(f"{models.get_family(name).name} declares no Family.tiny overrides")
    return found


def train(name: str, model_overrides: dict, folder: pathlib.Path, data_dir: str):
    """Runs `python -m mixer_jax.main` on one CPU device; returns (process, workdir)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)  # one CPU device
    config_file = folder / "config.py"
    config_file.write_text(
        "import runpy\n\n\ndef get_config():\n"
        f"    config = runpy.run_path({str(REPO / 'configs' / 'default.py')!r})['get_config']()\n"
        f"    config.model_name = {name!r}\n"
        f"    config.model.update({model_overrides!r})\n"
        "    return config\n")
    workdir = folder / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mixer_jax.main", f"--config={config_file}",
         f"--workdir={workdir}", f"--config.tfds_data_dir={data_dir}"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    return proc, workdir


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """name -> future of `train`'s result, for every name selected in this session."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and item.originalname == TEST_NAME]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    futures = {}
    for name in selected:
        try:
            model_overrides = overrides(name)
        except pytest.skip.Exception:
            continue  # the test itself skips, with the reason
        futures[name] = pool.submit(train, name, model_overrides,
                                    tmp_path_factory.mktemp(name), data_dir)
    yield futures
    pool.shutdown(cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_family_reaches_95_percent_on_digits(name, runs):
    overrides(name)
    proc, workdir = runs[name].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = [r for r in metric_writers.read_metrics(str(workdir)) if "eval_top1" in r][-1]
    assert final["eval_count"] == 360
    assert final["eval_top1"] >= 0.95, final
