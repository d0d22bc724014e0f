"""RandFormer's frozen mixing matrices (the model's constants) through the training job.

The job `python -m mixer_jax.main` runs (`train.train_and_evaluate`) on the embedded digits
with the family's tiny overrides: training, eval and checkpoints on an FSDP x model mesh,
a bitwise-exact resume, and fine-tuning from the run (orbax, restored into the shardings;
the official layout, on the host); `predict` of such files: test_official_weights. The
matrices must come out of all of it bit for bit as init drew them.
"""
import functools
import shutil

import jax
import numpy as np
import optax
import pytest

from mixer_jax import models, steps, train, train_checkpoint
from mixer_jax.models import metaformer

from test_train import assert_trees_equal, flat, tiny_config

NAME = "randformer_s12"


def randformer_config(data_dir, **changes):
    """4 steps of the tiny RandFormer on an FSDP x model mesh, weight decay on."""
    config = tiny_config(data_dir, **{
        "model_name": NAME, "total_steps": 4, "warmup_steps": 1, "progress_every": 2,
        "checkpoint_every": 2, "eval_every": 4, "batch": 16, "batch_eval": 120,
        "parallelism": "fsdp", "mesh_model": 2, "fsdp_min_size": 1, "weight_decay": 0.5,
        **changes})
    config.model.update(dict(models.get_family(NAME).tiny))
    return config


def frozen(variables) -> dict:
    return flat(variables[metaformer.FROZEN])


def init_matrices(config) -> dict:
    """The matrices a fresh run of `config` draws (the training job's own init)."""
    model = train.create_model(config, 10)
    init = functools.partial(steps.init_state, model, optax.sgd(0.0),
                             image_shape=(config.pp.crop, config.pp.crop, 3))
    return frozen(jax.jit(init)(jax.random.key(config.seed)).constants)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """A 4-step run (checkpoints at steps 2 and 4): (workdir, final metrics)."""
    workdir = str(tmp_path_factory.mktemp("randformer"))
    return workdir, train.train_and_evaluate(randformer_config(data_dir), workdir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.slow
def test_trains_resumes_bitwise_and_never_moves_its_matrices(run, data_dir, tmp_path):
    workdir, final = run
    config = randformer_config(data_dir)
    assert final["step"] == 4 and final["eval_count"] == 360 and np.isfinite(final["loss"])
    saved = train_checkpoint.restore_variables(workdir)
    start = init_matrices(config)
    assert sorted(start) == ["stages_2_blocks_0/token_mixer/random_matrix",
                             "stages_3_blocks_0/token_mixer/random_matrix"]
    assert_trees_equal(frozen(saved), start)  # weight decay and 4 updates later
    assert not np.array_equal(saved["params"]["stem_conv"]["kernel"],
                              train_checkpoint.restore_variables(workdir, step=2)["params"][
                                  "stem_conv"]["kernel"])  # the parameters did train

    # Resume from the step-2 checkpoint: the same end, bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / train_checkpoint.CHECKPOINT_DIR / "4")
    again = train.train_and_evaluate(config, str(resumed))
    assert again["loss"] == final["loss"] and again["eval_top1"] == final["eval_top1"]
    resumed_vars = train_checkpoint.restore_variables(str(resumed))
    assert_trees_equal(flat(resumed_vars["params"]), flat(saved["params"]))
    assert_trees_equal(frozen(resumed_vars), start)


@pytest.mark.slow
def test_fine_tuning_keeps_the_files_matrices(run, data_dir, tmp_path):
    """Another seed draws other matrices; fine-tuning takes the file's: from the run's orbax
    checkpoint on a mesh (read straight into the shardings), and from the same variables
    in the official layout (a .pth, `config.pretrained`) on pmap (read on the host)."""
    torch = pytest.importorskip("torch")
    workdir, _ = run
    saved = train_checkpoint.restore_variables(workdir)
    official = tmp_path / "official.pth"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in metaformer.to_official(saved).items()},
               official)
    fresh = init_matrices(randformer_config(data_dir, seed=7))
    assert not np.array_equal(*(m["stages_3_blocks_0/token_mixer/random_matrix"]
                                for m in (fresh, frozen(saved))))
    for source, parallelism in ((workdir, "data"), (str(official), "pmap")):
        config = randformer_config(data_dir, pretrained=source, seed=7,
                                   parallelism=parallelism, mesh_model=1)
        with train_checkpoint.TrainCheckpointer(str(tmp_path / parallelism)) as ckpt:
            run_ = train.prepare(config, ckpt)
        state = jax.device_get(run_.strategy.to_saveable(run_.state))
        assert_trees_equal(frozen(state.variables), frozen(saved))
        assert_trees_equal(flat(state.params), flat(saved["params"]))
