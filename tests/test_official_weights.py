"""The official IdentityFormer / RandFormer files (sail-sg/metaformer's key layout) wherever
weights are read: `load_pretrained`, `config.pretrained`, `checkpoint.load_official`,
`convert official-to-orbax` and `predict`.

The files are written here: our random-init variables of each name at one block per stage
(test_metaformer's reduced depth, 64x64 images), every parameter moved off its init, in the
official layout (`to_official`, whose parity with the official forward pass
test_metaformer checks), as a `.pth` (torch.save) and a `.safetensors`.
"""
import functools

import jax
import numpy as np
import pytest

from mixer_jax import checkpoint, convert, finetune, models, predict, train_checkpoint
from mixer_jax.models import metaformer as mf

from test_metaformer import DEPTHS, SIZE, _images, _jitted, _shake
from test_train import assert_trees_equal, flat

NAMES = ("identityformer_s12", "randformer_s12")


def model_of(name):
    return models.create_model(name, depths=DEPTHS)


@functools.lru_cache(maxsize=None)
def _init_fn(model):
    return jax.jit(lambda key: models.init_variables(model, key, (SIZE, SIZE, 3)))


def init(model, seed):
    return jax.device_get(_init_fn(model)(jax.random.key(seed)))


def official_files(name, folder):
    """(variables, path of the .pth, path of the .safetensors) of a perturbed `name`."""
    torch = pytest.importorskip("torch")
    from safetensors.numpy import save_file

    variables = init(model_of(name), 3)
    variables = dict(variables, params=mf._nest(_shake(mf._flat(variables["params"]), seed=5)))
    state = mf.to_official(variables)
    pth, safetensors = folder / f"{name}.pth", folder / f"{name}.safetensors"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, pth)
    save_file(state, str(safetensors))
    return variables, str(pth), str(safetensors)


def assert_variables_equal(a, b):
    assert sorted(a) == sorted(b)
    for collection in a:
        assert_trees_equal(flat(a[collection]), flat(b[collection]))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_load_pretrained_reads_both_file_kinds_into_the_model(name, tmp_path):
    variables, *files = official_files(name, tmp_path)
    model = model_of(name)
    fresh = init(model, 9)
    images = _images()
    expected = _jitted(model)(variables, images)[0]
    for path in files:
        loaded = finetune.load_pretrained(path, fresh)
        assert_variables_equal(loaded, variables)  # RandFormer: the file's matrices
        np.testing.assert_array_equal(_jitted(model)(loaded, images)[0], expected)
        assert_variables_equal(checkpoint.load_official(path), variables)
    weights = checkpoint.read_official(files[0])
    assert weights.num_classes == 1000 and weights.name is None  # not a published depth
    assert weights.preprocessing.input_size == (SIZE if name.startswith("rand") else 224)


@pytest.mark.slow
def test_convert_and_predict_take_a_randformer_file(tmp_path):
    """(`config.pretrained` with such a file: test_randformer_training.)"""
    name = "randformer_s12"
    variables, pth, _ = official_files(name, tmp_path)
    out = convert.official_to_orbax(pth, str(tmp_path / "orbax"))
    assert_variables_equal(train_checkpoint.restore_variables(out), variables)
    images = _images()
    expected = np.asarray(_jitted(model_of(name))(variables, images)[0])
    for source in (pth, out):
        loaded = predict.load_model(source)
        assert loaded.image_size == SIZE and loaded.model.num_classes == 1000
        assert_variables_equal(jax.device_get(loaded.variables), variables)
        logits = np.log(predict.probabilities(loaded, images))
        np.testing.assert_allclose(logits - logits[:, :1], expected - expected[:, :1],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_bad_official_file_raises_one_clear_error(tmp_path):
    torch = pytest.importorskip("torch")
    _, pth, _ = official_files("randformer_s12", tmp_path)
    state = torch.load(pth)
    fresh = init(model_of("randformer_s12"), 1)
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "stages.1.0.mlp.fc2.weight"},
                    r"lack 'stages\.1\.0\.mlp\.fc2\.weight'"),
        "unknown": ({**state, "stages.1.0.token_mixer.gate.weight": state["head.bias"]},
                    r"Unknown key 'stages\.1\.0\.token_mixer\.gate\.weight'"),
        "other_line": ({**{k: v for k, v in state.items() if "random_matrix" not in k},
                        "stages.0.0.token_mixer.pwconv1.weight": torch.zeros(128, 64)},
                       "stage 0 has a sepconv token mixer"),
    }
    for case, (bad, message) in cases.items():
        path = tmp_path / f"{case}.pth"
        torch.save(bad, path)
        with pytest.raises(checkpoint.CheckpointError,
                           match=f"{case}.pth' is not an official IdentityFormer/RandFormer "
                                 f"checkpoint: .*{message}"):
            finetune.load_pretrained(str(path), fresh)
    with pytest.raises(checkpoint.CheckpointError, match="pass the model's whole variables"):
        finetune.load_pretrained(pth, fresh["params"])
