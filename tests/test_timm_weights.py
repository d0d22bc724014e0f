"""timm's weight formats: every source kind, round trips, bad files, the Hub, convert's commands."""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from mixer_jax import checkpoint, convert, models, train_checkpoint
from mixer_jax.checkpoint import CheckpointError
from mixer_jax.models import registry

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

TINY = "Mixer-Ti_4"  # registered, 2 blocks: cheap; at the default 224 it has 56x56 tokens


def random_params(name: str, seed: int = 0, dtype=np.float32, **overrides) -> dict:
    """Parameters of `create_model(name)` at 224, every array random (the head too)."""
    shapes = models.param_shapes(models.create_model(name, **overrides))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape, np.float32)).astype(dtype),
                        shapes)


@pytest.fixture(scope="module")
def tiny():
    return random_params(TINY, num_classes=10)


@pytest.fixture(scope="module")
def tiny_state_dict(tiny):
    return checkpoint.to_timm(tiny, TINY)


@pytest.fixture(scope="module")
def gmixer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gmixer") / "gmixer_12_224.safetensors"
    return checkpoint.save_timm(random_params("gmixer_12_224"), "gmixer_12_224", path)


def assert_bitwise(a, b):
    flat_a, flat_b = checkpoint.flatten_params(a), checkpoint.flatten_params(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        assert flat_a[key].dtype == flat_b[key].dtype, key
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), key)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_save_then_load_is_bitwise(tmp_path, dtype):
    params = random_params(TINY, dtype=dtype, num_classes=10)
    path = checkpoint.save_timm(params, TINY, tmp_path / "tiny.safetensors")
    weights = checkpoint.read_timm(path)  # name, class count and preprocessing from the file
    assert (weights.name, weights.num_classes) == (TINY, 10)
    assert weights.preprocessing == registry.INCEPTION
    assert_bitwise(weights.params, params)
    assert_bitwise(checkpoint.load_timm(path, TINY), params)


@pytest.mark.slow
def test_saved_file_loads_strictly_in_timm(gmixer_file):
    state_dict = {k: torch.from_numpy(v) for k, v in load_file(gmixer_file).items()}
    with torch.device("meta"):
        model = timm.create_model("gmixer_12_224")
    model.load_state_dict(state_dict, strict=True, assign=True)  # raises on any key/shape mismatch
    weights = checkpoint.read_timm(gmixer_file)
    assert weights.name == "gmixer_12_224"
    assert weights.preprocessing.mean == registry.IMAGENET.mean


def test_every_source_kind_gives_the_same_params(tmp_path, tiny, tiny_state_dict):
    torch.save({k: torch.from_numpy(v) for k, v in tiny_state_dict.items()}, tmp_path / "w.pth")
    snapshot = tmp_path / "snapshot"  # a Hub snapshot folder: config.json + model.safetensors
    snapshot.mkdir()
    checkpoint.save_timm(tiny, TINY, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({
        "architecture": TINY, "num_classes": 10, "pretrained_cfg": {
            "input_size": [3, 224, 224], "mean": [0, 0, 0], "std": [1, 1, 1],
            "crop_pct": 0.9, "interpolation": "bilinear"}}))
    sources = {
        "pth": tmp_path / "w.pth",
        "numpy dict": tiny_state_dict,
        "torch dict": {k: torch.from_numpy(v) for k, v in tiny_state_dict.items()},
        "folder": snapshot,
    }
    for kind, source in sources.items():
        assert checkpoint.is_timm_source(source), kind
        weights = checkpoint.read_timm(source)
        assert weights.name == TINY, kind
        assert_bitwise(weights.params, tiny)
    assert not any(map(checkpoint.is_timm_source, [tmp_path / "m.npz", tmp_path, tiny]))
    folder = checkpoint.read_timm(snapshot)
    assert folder.preprocessing == registry.Preprocessing(
        mean=(0, 0, 0), std=(1, 1, 1), input_size=224, crop_pct=0.9, interpolation="bilinear")


def test_unnamed_mixer_weights_get_timms_name():
    """A state dict fits Mixer-S_32 and mixer_s32_224 alike; timm's weights get timm's name."""
    shapes = checkpoint.flatten_params(models.param_shapes(models.create_model("Mixer-S_32")))
    state_dict = models.get_family("mixer").to_timm(
        {k: np.zeros(s.shape, np.float32) for k, s in shapes.items()})
    weights = checkpoint.read_timm(state_dict)
    assert (weights.name, weights.num_classes) == ("mixer_s32_224", 1000)
    assert checkpoint.read_timm(state_dict, "Mixer-S_32").name == "Mixer-S_32"


def test_pth_without_torch_says_what_to_install(tmp_path, tiny_state_dict, monkeypatch):
    path = _write(tmp_path, {k: torch.from_numpy(v) for k, v in tiny_state_dict.items()}, ".pth")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match="needs torch .*safetensors"):
        checkpoint.load_timm(path)


def test_torch_bfloat16_tensors_keep_their_bits(tiny_state_dict):
    state_dict = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tiny_state_dict.items()}
    params = checkpoint.flatten_params(checkpoint.load_timm(state_dict, TINY))
    kernel = params["stem/kernel"]
    assert kernel.dtype == jnp.bfloat16
    want = state_dict["stem.proj.weight"].float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(kernel.astype(np.float32), want)


def test_google_npz_and_timm_file_give_the_same_model(tmp_path, tiny):
    from_npz = checkpoint.load_npz(checkpoint.save_npz(tiny, str(tmp_path / "g.npz")))
    from_timm = checkpoint.load_timm(checkpoint.save_timm(tiny, TINY, tmp_path / "t.safetensors"))
    assert_bitwise(from_npz, from_timm)
    images = np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32)
    logits = lambda params, **kw: np.asarray(jax.jit(models.create_model(
        TINY, num_classes=10, **kw).apply)({"params": params}, images))
    tanh, erf = logits(from_npz), logits(from_timm, gelu_approximate=False)
    np.testing.assert_array_equal(tanh, logits(from_timm))
    assert not np.array_equal(tanh, erf)  # only the GELU form differs, and only slightly
    np.testing.assert_allclose(erf, tanh, rtol=0.02, atol=0.02 * np.abs(tanh).max())


# ------------------------------------------------------------------------- bad files


def _truncated(path, size):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:size])


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


def _write(tmp_path, state_dict, suffix=".safetensors"):
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(state_dict, path)
    else:
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
    return path


def _edited(state_dict, edit):
    state_dict = dict(state_dict)
    edit(state_dict)
    return state_dict


BAD_FILES = {
    "truncated safetensors": (
        lambda tmp, sd: _truncated(_write(tmp, sd), 5000) or tmp / "w.safetensors",
        ["truncated"]),
    "truncated pth": (
        lambda tmp, sd: _truncated(_write(tmp, {k: torch.from_numpy(v) for k, v in sd.items()},
                                          ".pth"), 5000) or tmp / "w.pth",
        ["truncated or corrupt PyTorch"]),
    "pickle that runs code": (
        lambda tmp, sd: _write(tmp, {"stem.proj.weight": _RunsCode()}, ".pth"),
        ["could run code", "not loaded"]),
    "NaN": (
        lambda tmp, sd: _write(tmp, _edited(sd, lambda d: d.__setitem__(
            "blocks.1.norm1.weight", np.full_like(d["blocks.1.norm1.weight"], np.nan)))),
        ["'blocks.1.norm1.weight'", "64 NaN/Inf"]),
    "missing key": (
        lambda tmp, sd: _write(tmp, _edited(sd, lambda d: d.pop("blocks.1.mlp_tokens.fc2.bias"))),
        ["'blocks.1.mlp_tokens.fc2.bias' (shape (3136,)) is missing"]),
    "extra key": (
        lambda tmp, sd: _write(tmp, _edited(sd, lambda d: d.__setitem__(
            "blocks.1.ls1", np.ones(64, np.float32)))),
        ["'blocks.1.ls1' (shape (64,)) is not in the model"]),
    "reshaped key": (
        lambda tmp, sd: _write(tmp, _edited(sd, lambda d: d.__setitem__(
            "blocks.0.norm2.bias", np.ones(63, np.float32)))),
        ["'blocks.0.norm2.bias' has shape (63,), the model expects (64,)"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gives_one_clear_error(tmp_path, tiny_state_dict, case):
    make, phrases = BAD_FILES[case]
    _RunsCode.marker = tmp_path / "code-ran"
    path = make(tmp_path, tiny_state_dict)
    with pytest.raises(CheckpointError) as error:
        checkpoint.load_timm(path, TINY)
    for phrase in [repr(str(path))] + phrases:
        assert phrase in str(error.value), (phrase, str(error.value))
    assert not _RunsCode.marker.exists()


@pytest.mark.parametrize("model, phrases", [
    ("gmixer_24_224", ["'blocks.12.norm1.weight' (shape (384,)) is missing",
                       "this file is gmixer_12_224, the model is gmixer_24_224"]),
    ("mixer_s16_224", ["'stem.proj.weight' has shape (384, 3, 16, 16), the model expects "
                       "(512, 3, 16, 16)", "this file is gmixer_12_224, the model is mixer_s16_224"]),
])
def test_wrong_size_and_wrong_family_name_both_models(gmixer_file, model, phrases):
    with pytest.raises(CheckpointError) as error:
        checkpoint.load_timm(gmixer_file, model)
    assert all(p in str(error.value) for p in phrases), str(error.value)


def test_unknown_files_and_names(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="not a timm checkpoint of any model"):
        checkpoint.load_timm({"encoder.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match="No timm weights at"):
        checkpoint.load_timm(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="Unknown model 'resnet50'"):
        checkpoint.load_timm({"fc.weight": np.ones((2, 2), np.float32)}, "resnet50")
    with pytest.raises(CheckpointError, match="is not an array"):
        checkpoint.load_timm({"stem.proj.weight": object()})
    with pytest.raises(CheckpointError, match="has dtype <U4; weights are numbers"):
        checkpoint.load_timm({"stem.proj.weight": "text"})
    with pytest.raises(CheckpointError, match="the parameters are Mixer-Ti_4, the model is "
                                              "mixer_s32_224"):
        checkpoint.to_timm(tiny, "mixer_s32_224")


# ---------------------------------------------------------------------------- the Hub


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub with an empty cache under tmp_path and an endpoint nothing listens on."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []
    download = huggingface_hub.hf_hub_download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **kw: calls.append(kw["local_files_only"]) or download(*a, **kw))
    return constants, calls, tmp_path / "hub"


def test_hub_id_offline_fails_fast_without_retrying(hub):
    constants, calls, _ = hub
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="Cannot reach http://127.0.0.1:9 .*looks offline"):
        checkpoint.load_timm("hf-hub:timm/gmixer_24_224.ra3_in1k")
    print(f"failed after {time.monotonic() - start:.2f} s")
    assert calls == [True]  # the cache was asked; no download (huggingface_hub retries ~1 min)
    constants.HF_HUB_OFFLINE = True
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache and HF_HUB_OFFLINE"):
        checkpoint.load_timm("hf-hub:timm/gmixer_24_224.ra3_in1k")


def test_hub_id_reads_the_cached_snapshot(hub, tiny):
    _, calls, cache = hub
    repo = cache / "models--timm--mixer_ti4.test"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    checkpoint.save_timm(tiny, TINY, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({"architecture": TINY}))
    weights = checkpoint.read_timm("hf-hub:timm/mixer_ti4.test")
    assert weights.name == TINY and set(calls) == {True}
    assert_bitwise(weights.params, tiny)


# ------------------------------------------------------------------------ convert CLI


def run_cli(*argv):
    from absl import flags

    remaining = flags.FLAGS(["convert", *argv])
    try:
        convert.main(remaining)
    finally:
        flags.FLAGS.unparse_flags()


def test_convert_timm_npz_orbax_round_trips(tmp_path, tiny):
    source = checkpoint.save_timm(tiny, TINY, tmp_path / "t.safetensors")
    run_cli("timm-to-npz", f"--timm={source}", f"--out={tmp_path / 'm.npz'}")
    assert_bitwise(checkpoint.load_npz(str(tmp_path / "m.npz")), tiny)
    run_cli("npz-to-timm", f"--npz={tmp_path / 'm.npz'}", f"--out={tmp_path / 'back.safetensors'}")
    assert_bitwise(checkpoint.load_timm(tmp_path / "back.safetensors"), tiny)
    run_cli("timm-to-orbax", f"--timm={source}", f"--out={tmp_path / 'orbax'}")
    assert_bitwise(train_checkpoint.restore_params(str(tmp_path / "orbax")), tiny)
    run_cli("orbax-to-timm", f"--checkpoint={tmp_path / 'orbax'}",
            f"--out={tmp_path / 'o.safetensors'}", f"--model={TINY}")
    assert_bitwise(checkpoint.load_timm(tmp_path / "o.safetensors"), tiny)


def test_timm_to_npz_is_for_mixer_only(tmp_path, gmixer_file):
    with pytest.raises(CheckpointError, match="gmixer_12_224; .npz files hold MLP-Mixer"):
        convert.timm_to_npz(gmixer_file, str(tmp_path / "g.npz"))
