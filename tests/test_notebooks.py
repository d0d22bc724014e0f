"""Every notebook runs top to bottom (small, offline mode); the helpers they use.

The notebooks run in a Jupyter kernel of this interpreter (a kernelspec written to a
temporary directory), in a temporary folder, with mixer_jax from a non-editable install
of its wheel (`installed_package`), with `MIXER_JAX_NOTEBOOK_SMALL=1` (offline path, tiny step
counts), one CPU device and a cache directory shared by the notebooks of this module
(the first one trains the offline digits model, the others reuse it). The test
appends a cell of checks to each notebook before running it.
"""
import json
import os
import pathlib
import re
import sys
import tempfile
import threading
import time
import http.server

import jax
import nbformat
import numpy as np
import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

from mixer_jax import demo, models, visualize

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds; small mode needs a few
KERNEL = "mixer_jax_test"

# Checks run in the notebook's kernel after its last cell (names are the notebook's).
CHECKS = {
    "mixer_jax.ipynb": """
assert npz.name.startswith("Mixer-Ti_4_digits"), npz  # small mode: the offline path
assert config.dataset.endswith("digits_folder_inverted")
assert before["eval_count"] == after["eval_count"] == 360
assert after["eval_loss"] < before["eval_loss"], (before, after)  # fine-tuning learns
assert len(curve.ys) == config.total_steps and np.isfinite(curve.ys).all()
assert probs.shape == (10,) and abs(probs.sum() - 1) < 1e-5
""",
    "inside_mixer.ipynb": """
assert templates.shape == (arch.tokens_mlp_dim, *grid)
assert len(stats) == arch.num_blocks
assert set(features) >= {"stem", "block_0", "pre_logits"}
""",
    "mixing.ipynb": """
assert set(results) == set(mix.METHODS)
for method, (mixed, soft, lam, mask) in results.items():
    assert mixed.shape == images.shape and np.isfinite(mixed).all()
    np.testing.assert_allclose(soft.sum(-1), 1, rtol=1e-6)
    if method != "mixup":
        np.testing.assert_array_equal(lam, mask.mean(axis=(1, 2)))
""",
    "higher_resolution.ipynb": """
assert tile_gap < 1e-4, tile_gap
assert set(results) == {"block_diagonal", "reinit"} and len(rows) == 2
for method, runs in results.items():
    assert len(runs) == len(SEEDS) == 1
    assert [r["step"] for r in runs[0]] == list(range(STEPS + 1))  # step 0, then every step
    assert all(0 <= r["eval_top1"] <= 1 for r in runs[0])
assert sizes["block_diagonal"][0] == 4 * sizes["reinit"][0]  # D_S grows with the 4 tiles
""",
}

# The kernel ran the installed package (not the repository), quietly.
INSTALLED_CHECK = """
import os, mixer_jax
assert mixer_jax.__file__.startswith(os.environ["MIXER_JAX_EXPECTED_INSTALL"]), mixer_jax.__file__
"""


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory):
    """A kernelspec that starts this interpreter (not whatever `python` is on PATH)."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mixer_jax tests", "language": "python"}))
    return [str(root)]


@pytest.fixture(scope="module")
def notebook_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("notebook_cache")


@pytest.fixture
def kernel_env(monkeypatch, notebook_cache, installed_package):
    """The environment the kernel inherits: small mode, one CPU device, private dirs, and
    mixer_jax from a plain (non-editable) install, as a user's `pip install` gives it."""
    monkeypatch.setenv(demo.SMALL_ENV, "1")
    monkeypatch.setenv(demo.CACHE_ENV, str(notebook_cache))
    monkeypatch.setenv("TFDS_DATA_DIR", str(notebook_cache / "tensorflow_datasets"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(installed_package)] +
        [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("MIXER_JAX_EXPECTED_INSTALL", str(installed_package))
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    # The programs compiled here are the same on every run: cache them across runs.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.environ.get("JAX_COMPILATION_CACHE_DIR") or
                       os.path.join(tempfile.gettempdir(), "mixer_jax_test_compilation_cache"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def test_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} == set(CHECKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert "widgets" not in notebook.metadata


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_dirs, kernel_env, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(CHECKS[path.name] + INSTALLED_CHECK))
    manager = KernelManager(kernel_name=KERNEL,
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    client = NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT, kernel_name=KERNEL,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was drawn"
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    noise = re.search(r".*(cuInit|oneDNN|InitializeLog|xla_bridge|Downloading and preparing|"
                      r"reader\.py).*", streams)
    assert noise is None, noise.group(0)


# ------------------------------------------------------------------ visualize


def test_token_mixing_templates_are_kernel_columns_on_the_patch_grid():
    kernel = np.random.RandomState(0).normal(size=(6, 5))  # S = 2 x 3 tokens, D_S = 5
    templates = visualize.token_mixing_templates(kernel, (2, 3))
    assert templates.shape == (5, 2, 3)
    for unit in range(5):
        np.testing.assert_array_equal(templates[unit], kernel[:, unit].reshape(2, 3))
    assert templates[1, 1, 0] == kernel[3, 1]  # raster order: row 1, column 0 is token 3
    with pytest.raises(ValueError, match="3x3 patch grid"):
        visualize.token_mixing_templates(kernel, (3, 3))


def test_spatial_frequency_orders_smooth_before_fine():
    rows, cols = np.mgrid[:8, :8]
    constant = np.ones((8, 8))
    ramp = cols / 7.0
    checkerboard = (-1.0) ** (rows + cols)
    frequency = visualize.spatial_frequency(np.stack([constant, ramp, checkerboard]))
    assert frequency[0] == 0
    np.testing.assert_allclose(frequency[2], np.sqrt(0.5), rtol=1e-12)  # the highest there is
    assert 0 < frequency[1] < 0.25


def test_effective_rank():
    assert visualize.effective_rank(np.eye(7)) == pytest.approx(7)
    assert visualize.effective_rank(np.outer(np.arange(1, 5), np.arange(1, 4))) == pytest.approx(1)


def test_channel_mixing_stats_match_numpy_for_both_layouts():
    model = models.create_model("Mixer-Ti_4", num_classes=3)
    shapes = models.param_shapes(model, (8, 8, 3))
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda s: rs.normal(size=s.shape).astype(np.float32), shapes)
    stats = visualize.channel_mixing_stats(params)
    assert [s["block"] for s in stats] == [0, 1]
    kernel = params["MixerBlock_1"]["channel_mixing"]["Dense_1"]["kernel"]
    assert stats[1]["Dense_1_norm"] == pytest.approx(np.sqrt((kernel**2).sum()), rel=1e-6)
    assert stats[1]["Dense_1_std"] == pytest.approx(kernel.std(), rel=1e-6)
    assert 1 < stats[1]["Dense_1_effective_rank"] <= min(kernel.shape)
    assert visualize.channel_mixing_stats(jax.device_get(models.stack_blocks(params))) == stats


def test_token_pca_rgb_colours_tokens_by_their_main_direction():
    rs = np.random.RandomState(0)
    direction = rs.normal(size=16)
    amount = np.linspace(-1, 1, 2 * 9)  # 2 images of 3x3 tokens
    tokens = (amount[:, None] * direction + 1e-3 * rs.normal(size=(18, 16))).reshape(2, 9, 16)
    rgb = visualize.token_pca_rgb(tokens, (3, 3))
    assert rgb.shape == (2, 3, 3, 3) and rgb.min() >= 0 and rgb.max() <= 1
    first = rgb[..., 0].reshape(-1)
    order = np.argsort(first)  # the first component follows `amount` (either sign)
    assert list(order) in (list(range(18)), list(range(17, -1, -1)))
    np.testing.assert_allclose([first.min(), first.max()], [0, 1])
    with pytest.raises(ValueError, match="2x2 patch grid"):
        visualize.token_pca_rgb(tokens, (2, 2))


def test_token_similarity():
    same = np.tile([1.0, 2.0, 3.0], (4, 1))  # 4 tokens pointing the same way
    orthogonal = np.vstack([np.eye(3), np.zeros((1, 3))])  # a zero token counts as orthogonal
    opposite = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    similarity = visualize.token_similarity(np.stack([same, 2 * same, orthogonal, opposite]))
    np.testing.assert_allclose(similarity, [1, 1, 0, -1 / 3], atol=1e-12)


def test_live_curve_draws_every_point_it_was_given():
    curve = visualize.LiveCurve(ylabel="loss", every=2)
    for step, loss in enumerate([3.0, 2.0, 1.5], start=1):
        curve.add(step, np.float32(loss))
    curve.draw()
    (line,) = curve.ax.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(line.get_ydata(), [3.0, 2.0, 1.5])
    assert curve.ax.get_ylabel() == "loss"


def test_figures_have_one_panel_per_item():
    images = np.zeros((5, 8, 8, 3))
    grid = visualize.image_grid(images, titles=list("abcde"), colors=["red"] * 5, ncols=4)
    assert [ax.get_title() for ax in grid.axes if ax.images] == list("abcde")
    templates = visualize.plot_templates(np.random.RandomState(0).normal(size=(10, 3, 3)), ncols=4)
    assert sum(bool(ax.images) for ax in templates.axes) == 10
    features = {"stem": np.ones((2, 4, 6)), "block_0": np.arange(48.0).reshape(2, 4, 6)}
    panels = visualize.plot_token_features(np.zeros((2, 4, 4, 3)), features, (2, 2))
    assert len(panels.axes) == 2 * 4  # input, 2 layers, norms


def test_markdown_table():
    table = visualize.markdown_table([{"a": 1, "b": 0.5}, {"a": "x", "b": 2.0}],
                                     float_format="{:.1f}")
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5 |", "| x | 2.0 |"]


# ----------------------------------------------------------------------- demo


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path; yields (base URL, requested paths)."""
    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def send_head(self):
            requested.append((self.command, self.path))
            return super().send_head()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requested
    server.shutdown()
    server.server_close()


def test_reachable_answers_quickly_either_way(local_server, tmp_path):
    base, requested = local_server
    (tmp_path / "model.npz").write_bytes(b"x")
    assert demo.reachable(f"{base}/model.npz")
    assert requested == [("HEAD", "/model.npz")]
    assert not demo.reachable(f"{base}/missing.npz")
    closed = f"{base.rsplit(':', 1)[0]}:1/model.npz"  # nothing listens on port 1
    start = time.monotonic()
    assert not demo.reachable(closed, timeout=1.0)
    assert time.monotonic() - start < 5


def test_https_url_and_fetch(local_server, tmp_path):
    assert demo.https_url("gs://mixer_models/imagenet1k/Mixer-B_16.npz") == (
        "https://storage.googleapis.com/mixer_models/imagenet1k/Mixer-B_16.npz")
    assert demo.https_url("/data/a.npz") == "/data/a.npz"
    base, requested = local_server
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "digit.png").write_bytes(b"png bytes")
    cache = tmp_path / "cache"
    cache.mkdir()
    first = demo.fetch(f"{base}/files/digit.png", cache)
    assert first.read_bytes() == b"png bytes" and first.parent == cache
    assert demo.fetch(f"{base}/files/digit.png", cache) == first  # downloaded once
    assert requested == [("GET", "/files/digit.png")]
    assert not list(cache.glob("*.partial"))
    assert demo.fetch(str(first)) == first  # a local path stays as it is


def test_small_mode_and_configs(monkeypatch):
    monkeypatch.setenv(demo.SMALL_ENV, "1")
    assert demo.small_mode()
    monkeypatch.setenv(demo.SMALL_ENV, "0")
    assert not demo.small_mode()
    monkeypatch.delenv(demo.SMALL_ENV)
    assert not demo.small_mode()
    config = demo.load_config("default")
    assert (config.model_name, config.dataset, config.pp.crop) == ("Mixer-Ti_4", "sklearn_digits", 16)
    assert demo.load_config("mixer_b16_cifar10", "cifar100").dataset == "cifar100"
