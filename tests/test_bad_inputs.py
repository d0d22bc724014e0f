"""Bad input files and configs: each gives one clear error naming the cause and the file or key."""
import io
import logging
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from mixer_jax import checkpoint, convert, train_checkpoint
from mixer_jax.checkpoint import CheckpointError
from test_convert import random_params, run_cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def flat_params(seed=0):
    return {k: np.asarray(v) for k, v in checkpoint.flatten_params(random_params(seed)).items()}


def npy_bytes(shape, dtype="<f4", data=b""):
    """An .npy member whose header claims `shape` and `dtype`, followed by `data`."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return header.getvalue() + data  # the header begins with the magic


def npz_with(path, extra: dict, *, base=None):
    """A valid Mixer-Ti_4 npz (or `base`) with raw .npy members added or replaced."""
    np.savez(path, **(flat_params() if base is None else base))
    with zipfile.ZipFile(path, "a") as zf:
        for key, member in extra.items():
            zf.writestr(key + ".npy", member)
    return path


# ----------------------------------------------------------------------------- npz


@pytest.mark.parametrize("shape, claim", [((40_000_000_000,), "149.0 GiB"),   # 149 GiB of float32
                                          ((2**60,), "4294967296.0 GiB")])  # 4 EiB
def test_lying_headers_are_refused_before_allocating(tmp_path, shape, claim):
    base = flat_params()
    base.pop("head/bias")
    path = npz_with(tmp_path / "lie.npz", {"head/bias": npy_bytes(shape, data=b"\0" * 40)},
                    base=base)
    with pytest.raises(CheckpointError, match=rf"'head/bias' claims shape \({shape[0]},\) "
                                              rf"\({claim}\), more than any Mixer parameter"):
        checkpoint.load_npz(path)


def test_header_that_disagrees_with_its_member_size_is_refused(tmp_path):
    base = flat_params()
    base.pop("stem/bias")
    path = npz_with(tmp_path / "lie.npz", {"stem/bias": npy_bytes((1000,), data=b"\0" * 256)},
                    base=base)
    with pytest.raises(CheckpointError, match=r"'stem/bias' claims shape \(1000,\) of float32 "
                                              r"\(4000 bytes\) but its zip member holds 256 bytes"):
        checkpoint.load_npz(path)


_BOMB = textwrap.dedent("""
    import resource, sys
    import tensorflow  # what today's reader imports anyway: measured before, not charged
    from mixer_jax import checkpoint
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = peak()
    for path in sys.argv[1:]:
        try:
            checkpoint.load_npz(path)
        except checkpoint.CheckpointError as error:
            print("refused:", error)
    print("peak_rss_mib", before, peak())
""")


def _bomb(path, member, shape, nbytes):
    """A valid Mixer-Ti_4 npz plus `member`: `nbytes` of deflated zeros claiming `shape`."""
    np.savez(path, **{k: v for k, v in flat_params().items() if k != member})
    chunk = bytes(2**24)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open(member + ".npy", "w", force_zip64=True) as out:
            out.write(npy_bytes(shape))
            for _ in range(nbytes // len(chunk)):
                out.write(chunk)
    return path


@pytest.mark.slow
def test_zip_bombs_are_refused_before_inflating(tmp_path):
    # A 0.5 MiB file whose head claims (honestly) 512 MiB: more than a Ti_4 head can be.
    # (Members over 2 GiB are refused by the same header check: see the lying headers.)
    bomb = _bomb(tmp_path / "bomb.npz", "head/kernel", (64, 2**21), 2**29)
    assert bomb.stat().st_size < 4 * 2**20
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", _BOMB, str(bomb)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    refused = [line for line in proc.stdout.splitlines() if line.startswith("refused:")]
    assert len(refused) == 1, proc.stdout + proc.stderr[-2000:]
    assert ("'head/kernel' claims shape (64, 2097152), larger than any array of the Mixer-Ti_4 "
            "its other arrays describe (at most 8388608 values)") in refused[0]
    before, peak = map(float, proc.stdout.split("peak_rss_mib")[1].split())
    assert peak - before < 64, (before, peak)  # nothing was inflated


def test_bfloat16_files_load_as_bfloat16(tmp_path):
    import ml_dtypes
    flat = flat_params()
    as_void = {k: v.astype(ml_dtypes.bfloat16).view("V2") for k, v in flat.items()}
    np.savez(tmp_path / "bf16.npz", **as_void)  # how big_vision's files look to numpy: |V2
    loaded = checkpoint.flatten_params(checkpoint.load_npz(tmp_path / "bf16.npz"))
    for key, value in flat.items():
        assert loaded[key].dtype == ml_dtypes.bfloat16, key
        np.testing.assert_array_equal(loaded[key], value.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_float16_and_float64_files_say_they_are_cast(tmp_path, dtype, caplog):
    np.savez(tmp_path / "p.npz", **{k: v.astype(dtype) for k, v in flat_params().items()})
    with caplog.at_level(logging.INFO, logger="mixer_jax.checkpoint"):
        loaded = checkpoint.flatten_params(checkpoint.load_npz(tmp_path / "p.npz"))
    assert loaded["stem/kernel"].dtype == dtype
    assert any(f"stores {dtype} arrays; models load them cast to their own parameter dtype"
               in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------- convert


def _edit(flat, *, drop=(), add=None, reshape=None):
    flat = {k: v for k, v in flat.items() if k not in drop}
    flat.update(add or {})
    for key, shape in (reshape or {}).items():
        flat[key] = np.zeros(shape, np.float32)
    return flat


CONVERT_CASES = {
    "missing key": (dict(drop=["MixerBlock_1/channel_mixing/Dense_0/bias"]),
                    r"has no 'MixerBlock_1/channel_mixing/Dense_0/bias' \(the model expects "
                    r"shape \(128,\)\)"),
    "missing head": (dict(drop=["head/kernel", "head/bias"]), r"it has no head"),
    "extra key": (dict(add={"MixerBlock_0/extra/kernel": np.ones((2, 2), np.float32)}),
                  r"has 'MixerBlock_0/extra/kernel' \(shape \(2, 2\)\), which the model does "
                  "not have"),
    "wrong shape": (dict(reshape={"MixerBlock_1/channel_mixing/Dense_1/kernel": (128, 65)}),
                    r"'MixerBlock_1/channel_mixing/Dense_1/kernel': the model expects shape "
                    r"\(128, 64\), .* has \(128, 65\)"),
    "path traversal key": (dict(add={"../../etc/kernel": np.ones(3, np.float32)}),
                           r"has '../../etc/kernel' \(shape \(3,\)\), which the model does not"),
}


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_convert_refuses_an_incomplete_or_edited_model(tmp_path, case):
    edit, message = CONVERT_CASES[case]
    source = tmp_path / "in.npz"
    np.savez(source, **_edit(flat_params(), **edit))
    with pytest.raises(CheckpointError, match=rf"Cannot convert '{source}': it is not a "
                                              rf"complete, valid MLP-Mixer \(.*{message}"):
        convert.npz_to_orbax(str(source), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing written


def test_convert_to_an_existing_out_needs_overwrite(tmp_path):
    first = checkpoint.save_npz(random_params(0), str(tmp_path / "a.npz"))
    second = checkpoint.save_npz(random_params(1), str(tmp_path / "b.npz"))
    out = tmp_path / "orbax"
    run_cli("npz-to-orbax", f"--npz={first}", f"--out={out}")
    with pytest.raises(CheckpointError, match=rf"--out {out} already exists; pass --overwrite"):
        run_cli("npz-to-orbax", f"--npz={second}", f"--out={out}")
    run_cli("npz-to-orbax", f"--npz={second}", f"--out={out}", "--overwrite")
    restored = checkpoint.flatten_params(train_checkpoint.restore_params(str(out)))
    np.testing.assert_array_equal(restored["stem/kernel"], flat_params(1)["stem/kernel"])
    with pytest.raises(CheckpointError, match=rf"--out {tmp_path / 'a.npz'} already exists"):
        convert.orbax_to_npz(str(out), first)


# -------------------------------------------------------------------------- config

from mixer_jax import train, train_config  # noqa: E402
from mixer_jax.errors import ConfigError  # noqa: E402
from test_configs import CONFIG_DIR, load  # noqa: E402

CONFIG_CASES = {
    "--config.accum_steps=0": "accum_steps=0 must be a positive integer",
    "--config.mesh_model=0": "mesh_model=0 must be a positive integer",
    "--config.pp.crop=0": "pp.crop=0 must be a positive integer",
    "--config.pp.crop=-16": "pp.crop=-16 must be a positive integer",
    "--config.shuffle_buffer=-5": "shuffle_buffer=-5 must be a positive integer",
    "--config.batch_eval=0": "batch_eval=0 must be a positive integer",
    "--config.model.hidden_dim=0": "model.hidden_dim=0 must be a positive integer",
    "--config.model.dropout=1.5": "model.dropout=1.5 must be in [0, 1)",
}


@pytest.mark.parametrize("flag", sorted(CONFIG_CASES))
def test_each_bad_config_value_is_a_line_of_the_invalid_config_list(flag):
    config = train_config.with_defaults(load(str(CONFIG_DIR / "default.py"), flag))
    with pytest.raises(ConfigError) as error:
        train_config.validate(config, num_devices=8)
    assert str(error.value).splitlines() == ["Invalid config:", f"  - {CONFIG_CASES[flag]}"]


def test_all_bad_values_are_listed_together():
    cases = {k: v for k, v in CONFIG_CASES.items() if k != "--config.pp.crop=0"}  # one crop
    config = train_config.with_defaults(load(str(CONFIG_DIR / "default.py"), *cases))
    with pytest.raises(ConfigError) as error:
        train_config.validate(config, num_devices=8)
    lines = str(error.value).splitlines()[1:]
    assert sorted(lines) == sorted(f"  - {m}" for m in cases.values())


def test_architecture_fields_can_be_set_on_the_command_line():
    config = load(str(CONFIG_DIR / "default.py"), "--config.model.hidden_dim=32",
                  "--config.model.num_blocks=3")
    train_config.validate(train_config.with_defaults(config), num_devices=8)
    model = train.create_model(train_config.with_defaults(config), num_classes=10)
    assert (model.hidden_dim, model.num_blocks, model.patch_size) == (32, 3, 4)


def test_model_options_are_checked_against_the_models_family():
    config = train_config.with_defaults(load(str(CONFIG_DIR / "default.py")))
    config.model.hiden_dim = 32
    with pytest.raises(ConfigError, match=r"unknown model option\(s\) \['hiden_dim'\] for "
                                          r"Mixer-Ti_4; known: \[.*'hidden_dim'"):
        train_config.validate(config)


# ---------------------------------------------------------------------- image folders

from PIL import Image  # noqa: E402

from mixer_jax import input_pipeline  # noqa: E402


def image_folder(root, classes={"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 2}}):
    for split, counts in classes.items():
        for cls, count in counts.items():
            os.makedirs(root / split / cls, exist_ok=True)
            for i in range(count):
                Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(
                    root / split / cls / f"{i}.png")
    return root


def folder_config(root, **changes):
    config = train_config.base_config()
    config.dataset = str(root)
    config.pp.crop, config.pp.resize = 8, None
    config.update(changes)
    return config


def add_bad_images(root):
    """A truncated JPEG, a zero-byte PNG and a text file named .png."""
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(jpeg, "JPEG")
    bad = {root / "train" / "a" / "cut.jpg": jpeg.getvalue()[:len(jpeg.getvalue()) // 2],
           root / "train" / "b" / "empty.png": b"",
           root / "test" / "a" / "text.png": b"just some notes, not a picture\n"}
    for path, data in bad.items():
        path.write_bytes(data)
    return bad


def test_every_bad_image_is_named_before_training_or_skipped_on_request(tmp_path, caplog):
    root = image_folder(tmp_path)
    bad = add_bad_images(root)
    input_pipeline._cached_source.cache_clear()
    with pytest.raises(input_pipeline.BadImagesError) as error:
        input_pipeline.get_dataset_info(folder_config(root))
    lines = str(error.value).splitlines()
    assert lines[0] == (f"Image directory {root} has 3 unreadable image file(s); fix or remove "
                        "them, or set config.skip_bad_images=True to train without them:")
    assert lines[1:] == [f"  {root}/test/a/text.png: not an image file (unrecognised content)",
                         f"  {root}/train/a/cut.jpg: corrupt image (Truncated File Read)",
                         f"  {root}/train/b/empty.png: empty file (0 bytes)"]

    with caplog.at_level("WARNING"):
        info = input_pipeline.get_dataset_info(folder_config(root, skip_bad_images=True))
    assert (info.num_train_examples, info.num_eval_examples) == (6, 4)
    skipped = [r.getMessage() for r in caplog.records if "Skipping unreadable image" in r.getMessage()]
    assert len(skipped) == 3 and all(any(str(p) in m for m in skipped) for p in bad)
    batch = next(input_pipeline.train_dataset(folder_config(
        root, skip_bad_images=True, batch=6)).as_numpy_iterator())  # decodes: nothing bad left
    assert batch["image"].shape == (6, 8, 8, 3)


def test_image_check_runs_once_per_file_and_again_when_a_file_changes(tmp_path, monkeypatch):
    root = image_folder(tmp_path)
    checked = []
    problem = input_pipeline._image_problem
    monkeypatch.setattr(input_pipeline, "_image_problem",
                        lambda path: checked.append(path) or problem(path))
    input_pipeline._folder_source(str(root))
    assert len(checked) == 10
    input_pipeline._folder_source(str(root))
    assert len(checked) == 10  # all cached
    (root / "train" / "a" / "1.png").write_bytes(b"")
    with pytest.raises(input_pipeline.BadImagesError, match="train/a/1.png: empty file"):
        input_pipeline._folder_source(str(root))
    assert checked[10:] == [str(root / "train" / "a" / "1.png")]


def test_a_class_only_in_test_is_an_error(tmp_path):
    root = image_folder(tmp_path, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "c": 1}})
    input_pipeline._cached_source.cache_clear()
    with pytest.raises(input_pipeline.BadImagesError,
                       match=rf"Image directory {root}: class\(es\) 'c' \(only in test/\) have no "
                             "images in the training split 'train'; the model could never predict"):
        input_pipeline.get_dataset_info(folder_config(root))


def test_a_one_class_folder_is_an_error(tmp_path):
    root = image_folder(tmp_path, {"train": {"cats": 2}, "test": {"cats": 1}})
    input_pipeline._cached_source.cache_clear()
    with pytest.raises(input_pipeline.BadImagesError,
                       match=rf"Image directory {root} has a single class \('cats'\); a classifier "
                             "needs two or more"):
        input_pipeline.get_dataset_info(folder_config(root))


def test_empty_class_folders_are_reported(tmp_path, caplog):
    root = image_folder(tmp_path)
    os.makedirs(root / "train" / "zebra")
    os.makedirs(root / "test" / "zebra")
    input_pipeline._cached_source.cache_clear()
    with caplog.at_level("WARNING"):
        info = input_pipeline.get_dataset_info(folder_config(root))
    assert info.label_names == ["a", "b"]
    assert any(f"2 class folder(s) hold no images and are ignored: {root}/test/zebra, "
               f"{root}/train/zebra" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------- predict

from mixer_jax import predict  # noqa: E402


def test_predict_refuses_a_corrupt_or_non_finite_orbax_checkpoint(tmp_path):
    params = random_params()
    convert.npz_to_orbax(checkpoint.save_npz(params, str(tmp_path / "p.npz")), str(tmp_path / "o"))
    predict.load_params(str(tmp_path / "o"))  # intact: loads
    data = max((p for p in (tmp_path / "o" / "0" / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    corrupted = bytearray(data.read_bytes())
    corrupted[len(corrupted) // 2] ^= 1
    data.write_bytes(bytes(corrupted))
    with pytest.raises(predict.PredictError,
                       match=r"The checkpoint of step 0 in .*/o is corrupt: .* does not match the "
                             r"SHA-256 recorded when it was written"):
        predict.load_params(str(tmp_path / "o"))

    params = {**params, "head": {"kernel": params["head"]["kernel"],
                                 "bias": np.array(params["head"]["bias"])}}
    params["head"]["bias"][1] = np.nan
    train_checkpoint.save_params(params, str(tmp_path / "nan"))
    with pytest.raises(predict.PredictError, match=r"parameter 'head/bias' holds NaN/Inf"):
        predict.load_params(str(tmp_path / "nan"))
