"""A new user's first hour: the command lines' one-line errors (mixer_jax.cli), quiet
start-up, progress from the first second, start-up checks, shipped configs, and the
run's class names in predict. The slow tests run the programs from a non-editable
install (`installed_package`, a wheel installed into a temporary folder) or end to end.
"""
import configparser
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
import setuptools
from PIL import Image

from mixer_jax import (checkpoint, cli, demo, input_pipeline, labels, metric_writers,
                       predict, train, train_config)
from mixer_jax.errors import ConfigError, UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
# Lines that must never reach a default console: TF/CUDA/XLA start-up, absl's own prefix
# on library records, tfds' build chatter, tracebacks.
NOISE = re.compile(r"cuInit|cuda|oneDNN|absl::|InitializeLog|libtpu|xla_bridge|"
                   r"tensorflow|dataset_builder|Downloading and preparing|reader\.py|"
                   r"Traceback|^[IWE]\d{4} ", re.IGNORECASE | re.MULTILINE)


def run_python(*args, cwd, pythonpath=REPO, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    env["PYTHONPATH"] = str(pythonpath)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the program must be quiet by itself
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a user's laptop
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------------- one-line errors


def test_misspelt_command_line_key_prints_one_line_with_the_suggestion(tmp_path):
    result = run_python("-m", "mixer_jax.main", "--config=default",
                        f"--workdir={tmp_path / 'wd'}", "--config.total_step=10", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines == ['error: Unknown config key --config.total_step. Did you mean '
                     '"total_steps" instead of "total_step"?'], result.stderr


def failing(error):
    def main(argv):
        raise error
    return main


def test_user_errors_are_one_line_with_status_2_and_a_traceback_on_request(
        capsys, monkeypatch):
    error = ConfigError("Invalid config:\n  - unknown key total_step\n  - batch must be > 0")
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.run(failing(error), ["prog"])
    assert exit_.value.code == cli.USER_ERROR_STATUS == 2
    assert capsys.readouterr().err == (
        "error: Invalid config: unknown key total_step; batch must be > 0\n")

    with pytest.raises(SystemExit):
        cli.run(failing(error), ["prog", "--verbose"])
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("batch must be > 0\n")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(SystemExit):
        cli.run(failing(error), ["prog"])
    assert "Traceback" in capsys.readouterr().err

    monkeypatch.delenv(cli.DEBUG_ENV)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback (Python prints it)
        cli.run(failing(ZeroDivisionError("bug")), ["prog"])
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda argv: 1, ["prog"])
    assert exit_.value.code == 1


def test_bad_flags_are_user_errors():
    from absl import flags

    fv = flags.FlagValues()
    flags.DEFINE_integer("steps", 1, "", flag_values=fv)
    with pytest.raises(cli.FlagError, match="stepz"):
        cli.parse_flags(["prog", "--stepz=3"], fv)
    with pytest.raises(UserError, match="steps"):
        cli.parse_flags(["prog", "--steps=many"], fv)
    assert cli.parse_flags(["prog", "--steps=3", "--verbose", "file"], fv) == ["prog", "file"]
    assert fv.steps == 3 and fv.verbose


# -------------------------------------------------------------------- shipped configs


def test_config_names_and_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = str(train_config.configs_dir() / "default.py")
    assert train_config.config_path("default") == default
    assert train_config.config_path("configs/default.py") == default
    assert train_config.config_path("mixer_b16_cifar10:cifar100").endswith(
        "mixer_b16_cifar10.py:cifar100")
    own = tmp_path / "mine.py"
    own.write_text("")
    assert train_config.config_path("mine.py") == "mine.py"
    with pytest.raises(ConfigError, match="default, mixer_b16_cifar10"):
        train_config.config_path("defualt")
    assert cli.with_config_paths(["prog", "--config=default", "--x", "--config", "default"]) == [
        "prog", f"--config={default}", "--x", "--config", default]
    assert demo.load_config("mixer_b16_folder", "/data").dataset == "/data"


def test_setup_cfg_packages_every_module_and_ships_the_configs():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    listed = setup["options"]["packages"].split()
    found = setuptools.find_packages(str(REPO), include=["mixer_jax", "mixer_jax.*"])
    assert sorted(listed) == sorted(found + ["mixer_jax.configs"])
    assert setup["options"]["package_dir"].split() == ["mixer_jax.configs", "=", "configs"]
    assert set(train_config.shipped_configs()) >= {"default", "mixer_b16_folder"}


# ---------------------------------------------------------------------- start-up checks


def info(num_classes=10, train=1437, test=360):
    return input_pipeline.DatasetInfo(num_classes, train, test, None)


def test_start_up_checks_name_the_key_and_the_fix():
    config = train_config.with_defaults(demo.load_config("mixer_b16_folder", "/data"))
    train_config.check_before_training(config, info())
    config.pp.crop = 448
    with pytest.raises(ConfigError, match=r"pp.resize=256 .* smaller than pp.crop=448: set "
                                          r"pp.resize=512 .* or pp.resize=None"):
        train_config.check_before_training(config, info())
    config.pp.resize = None
    train_config.check_before_training(config, info())
    with pytest.raises(ConfigError, match="pp.test='test' selects no examples") as error:
        train_config.check_before_training(config, info(num_classes=1, test=0))
    assert "1 class(es)" in str(error.value)
    assert train_config.eval_resize(224) == 256 and train_config.eval_resize(448) == 512


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("changes, message", [
    ({"pp.crop": 32, "pp.resize": 16}, "pp.resize=16 .* smaller than pp.crop=32"),
    ({"pp.test": "test[:0]"}, "pp.test='test\\[:0\\]' selects no examples"),
])
def test_training_stops_at_start_up_before_the_first_step(tmp_path, data_dir, changes,
                                                          message):
    config = demo.load_config("default")
    config.tfds_data_dir = data_dir
    for key, value in changes.items():
        group, _, name = key.rpartition(".")
        (config[group] if group else config)[name] = value
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / metric_writers.METRICS_FILE).exists()  # no step ran
    assert not list((tmp_path / "checkpoints").glob("[0-9]*"))


# --------------------------------------------------------------------------- progress


def test_progress_shows_phases_and_slow_steps_until_the_first_report():
    lines, now = [], [0.0]
    progress = metric_writers.Progress(total_steps=100, global_batch=8, log=lines.append,
                                       clock=lambda: now[0], early_every=2.0, bar=False)
    with progress.phase("Compiling the train step"):
        now[0] += 41.0
    assert lines == ["Compiling the train step ...", "Compiling the train step: 41.0 s"]
    progress.restart(1)
    for step in (2, 3, 4):  # 3 s per step: each gets a line
        now[0] += 3.0
        assert progress.wants_step_lines
        progress.step(step)
    assert lines[2:] == ["step   2/100 | 2.7 img/s | ETA 4m54s",
                         "step   3/100 | 2.7 img/s | ETA 4m51s",
                         "step   4/100 | 2.7 img/s | ETA 4m48s"]
    now[0] += 0.5  # a fast step: no line
    progress.step(5)
    assert len(lines) == 5
    now[0] += 0.5
    progress.report(6, {"loss": 1.0})
    assert lines[-1] == "step   6/100 | loss 1 | 16.0 img/s | ETA 47s"  # steps 5-6 in 1 s
    assert not progress.wants_step_lines
    now[0] += 30.0
    progress.step(7)  # after the first report, only reports print
    assert len(lines) == 6


def test_a_report_right_after_a_step_line_keeps_its_throughput():
    lines, now = [], [0.0]
    progress = metric_writers.Progress(total_steps=100, global_batch=8, log=lines.append,
                                       clock=lambda: now[0], bar=False)
    progress.restart(1)
    now[0] += 3.0
    progress.step(2)  # a slow step: its line measures it
    assert progress.report(2, {"loss": 1.0}) == {"img_per_sec": 8 / 3, "steps_per_sec": 1 / 3}
    assert lines == ["step   2/100 | 2.7 img/s | ETA 4m54s",
                     "step   2/100 | loss 1 | 2.7 img/s | ETA 4m54s"]  # not 0 img/s


def test_progress_bar_counts_steps_and_shows_the_report():
    lines, now = [], [0.0]
    progress = metric_writers.Progress(total_steps=10, global_batch=8, log=lines.append,
                                       clock=lambda: now[0], bar=True)
    assert not progress.wants_step_lines  # a bar needs no synchronisation
    for step in range(1, 5):
        now[0] += 1.0
        progress.step(step)
    progress.report(4, {"loss": 0.5})
    assert progress._bar.n == 4 and "loss 0.5" in str(progress._bar.postfix)
    assert lines == []
    progress.close()


# ------------------------------------------------------------- files, labels, top-k


def test_local_npz_files_need_no_tensorflow(tmp_path):
    code = f"""
import sys
import jax
import numpy as np
from mixer_jax import checkpoint, models
shapes = models.param_shapes(models.create_model("Mixer-Ti_4", num_classes=3), (8, 8, 3))
params = jax.tree.map(lambda s: np.full(s.shape, 0.5, np.float32), shapes)
path = checkpoint.save_npz(params, {str(tmp_path / 'sub' / 'a.npz')!r})
loaded = checkpoint.load_npz(path)
assert loaded["head"]["kernel"].shape == shapes["head"]["kernel"].shape
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
print("ok")
"""
    result = run_python("-c", code, cwd=tmp_path)
    assert result.stdout.strip() == "ok", result.stderr
    with pytest.raises(checkpoint.CheckpointError, match="No checkpoint file"):
        checkpoint.load_npz(tmp_path / "missing.npz")
    with pytest.raises(checkpoint.CheckpointError, match="is a directory"):
        checkpoint.load_npz(tmp_path)


def test_digits_have_their_own_names():
    assert labels.label_names("sklearn_digits", 10) == [str(d) for d in range(10)]


# ------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_installed_package_trains_quietly_from_any_folder(installed_package, tmp_path):
    result = run_python("-m", "mixer_jax.main", "--config=default", "--workdir=wd",
                        "--config.total_steps=10", "--config.warmup_steps=1",
                        cwd=tmp_path, pythonpath=installed_package)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = output.strip().splitlines()
    assert len(lines) <= 20, output
    assert not NOISE.search(output), NOISE.search(output)
    assert "model_name" not in output  # the config goes to the workdir, not the console
    assert lines[-1].endswith(f"Done at step 10: test top-1 {lines[-1].split('top-1 ')[1]}"
                              ) and str(tmp_path / "wd") in lines[-1]
    assert any("Compiling and running the first train step:" in line for line in lines)
    assert any(line.endswith("Training Mixer-Ti_4 steps 1-10, global batch 128, on 1 cpu "
                             "device(s).") for line in lines)
    saved = json.loads((tmp_path / "wd" / metric_writers.CONFIG_FILE).read_text())
    assert saved["model_name"] == "Mixer-Ti_4" and saved["total_steps"] == 10

    # A start-up check stops a run at once; --verbose adds the config and the traceback.
    bad = ["-m", "mixer_jax.main", "--config=default", "--workdir=wd2", "--config.pp.resize=8"]
    quiet = run_python(*bad, cwd=tmp_path, pythonpath=installed_package)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines()[-1].startswith(
        "error: Invalid config for this dataset: pp.resize=8 (the eval images' shorter side")
    assert not NOISE.search(quiet.stderr) and "model_name" not in quiet.stderr
    loud = run_python(*bad, "--verbose", cwd=tmp_path, pythonpath=installed_package)
    assert loud.returncode == 2
    assert "model_name: Mixer-Ti_4" in loud.stderr and "Traceback" in loud.stderr
    assert not (tmp_path / "wd2" / "checkpoints").exists() or not list(
        (tmp_path / "wd2" / "checkpoints").glob("[0-9]*"))


@pytest.mark.slow
def test_misspelt_key_in_a_config_file_is_one_line(tmp_path):
    (tmp_path / "mine.py").write_text(
        "from mixer_jax import train_config\n\ndef get_config():\n"
        "    c = train_config.base_config()\n    c.total_step = 5\n    return c\n")
    result = run_python("-m", "mixer_jax.main", "--config=mine.py", "--workdir=wd",
                        cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == "error: Invalid config: unknown key total_step (did you mean 'total_steps'?)"
    assert len(lines) <= 2 and "Traceback" not in result.stderr, result.stderr  # + "Setting up"


def write_folder(root, classes=("cat", "dog", "fox"), per_class=6):
    """A tiny image folder {train,test}/<class>/<n>.png: one colour per class."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                image = np.full((8, 8, 3), 40 + 80 * c, np.uint8) + rng.integers(
                    0, 20, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_predict_shows_the_class_names_of_a_folder_run(tmp_path, caplog, capsys):
    folder = write_folder(tmp_path / "images")
    config = demo.load_config("default")
    config.dataset = str(folder)
    config.batch = config.batch_eval = 8  # one image per simulated device
    config.total_steps, config.warmup_steps = 4, 1
    config.eval_every = config.checkpoint_every = 4
    workdir = tmp_path / "wd"
    caplog.set_level("INFO")
    train.train_and_evaluate(config, str(workdir))
    evals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Eval at")]
    assert evals and all("top-5" not in line for line in evals)  # 3 classes: top-5 is 1

    image = folder / "test" / "fox" / "0.png"
    assert predict.main([f"--checkpoint={workdir}", "--top_k=3", str(image)]) == 0
    out = capsys.readouterr()
    assert "no class names" not in out.err
    assert {line.split()[1] for line in out.out.splitlines()[1:]} == {"cat", "dog", "fox"}
    assert labels.checkpoint_names(str(workdir), 3) == ["cat", "dog", "fox"]
    assert labels.checkpoint_names(str(workdir), 5) is None  # another head: not its names


def test_label_source_errors_are_user_errors(tmp_path):
    latin1 = tmp_path / "names.txt"
    latin1.write_bytes("caf\xe9\nth\xe9\n".encode("latin-1"))
    with pytest.raises(labels.LabelsError, match=r"names.txt' is not UTF-8 text") as error:
        labels.label_names(str(latin1), 2)
    assert isinstance(error.value, UserError)  # one line from predict, exit status 2
    with pytest.raises(UserError, match="21843 lines"):
        labels.label_names("imagenet21k", 21843)
