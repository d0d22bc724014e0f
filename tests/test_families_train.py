"""Families train through `mixer_jax.main` on the embedded digits (issue 10's end-to-end check).

Each name runs the default digits recipe (configs/default.py: 16x16 images, Adam, 200
steps) with its family's tiny overrides (`Family.tiny`, which must give a model that
takes 16x16 images) set in `config.model` by a config file written for the test. Names whose family is not
registered yet are skipped; they run as soon as their family file lands.
"""
import os
import pathlib
import subprocess
import sys

import pytest

from mixer_jax import metric_writers, models

REPO = pathlib.Path(__file__).resolve().parents[1]
# name -> module-field overrides (None: the family's `Family.tiny`)
# (MLP-Mixer's own run is the README's main job, tested in test_cli.py.)
NAMES = {"resmlp_12_224": None, "gmlp_ti16_224": None}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_family_reaches_95_percent_on_digits(name, tmp_path, data_dir):
    if name not in models.list_models():
        pytest.skip(f"{name} is not registered yet")
    overrides = NAMES[name] if NAMES[name] is not None else dict(models.get_family(name).tiny)
    if not overrides:
        pytest.skip(f"{models.get_family(name).name} declares no Family.tiny overrides")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("XLA_FLAGS", None)  # one CPU device
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "import runpy\n\n\ndef get_config():\n"
        f"    config = runpy.run_path({str(REPO / 'configs' / 'default.py')!r})['get_config']()\n"
        f"    config.model_name = {name!r}\n"
        f"    config.model.update({overrides!r})\n"
        "    return config\n")
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mixer_jax.main", f"--config={config_file}",
         f"--workdir={workdir}", f"--config.tfds_data_dir={data_dir}"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = [r for r in metric_writers.read_metrics(str(workdir)) if "eval_top1" in r][-1]
    assert final["eval_count"] == 360
    assert final["eval_top1"] >= 0.95, final
