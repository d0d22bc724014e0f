"""Tests for mixer_jax.benchmark: FLOP counts, XLA cross-check, the command end to
end, sharding memory plans, and the pipeline-only mode."""
import functools
import json
import math

import jax
import jax.numpy as jnp
import pytest

from mixer_jax import models, parallel, steps
from mixer_jax.benchmark import __main__ as cli
from mixer_jax.benchmark import flops, measure, sharding

# Paper: forward GFLOP per 224x224 image.
PAPER_GFLOPS = {"Mixer-B_16": 25.2, "Mixer-S_32": 2.0, "Mixer-L_16": 89.1}


@pytest.mark.parametrize("variant", sorted(PAPER_GFLOPS))
def test_forward_flops_match_paper(variant):
    assert round(flops.mixer_flops(variant, 224) / 1e9, 1) == PAPER_GFLOPS[variant]


def test_flops_terms_by_hand():
    # Mixer-B/16 at 224: 196 tokens, C=768, D_S=384, D_C=3072, 12 blocks.
    terms = flops.forward_flops_terms("Mixer-B_16", 224)
    assert terms == {
        "stem": 2 * 196 * 16 * 16 * 3 * 768,
        "token_mixing": 12 * 2 * (768 * 196 * 384 + 768 * 384 * 196),
        "channel_mixing": 12 * 2 * (196 * 768 * 3072 + 196 * 3072 * 768),
        "head": 2 * 768 * 1000,
    }
    # Tokens scale with the image area; the head does not.
    at_448 = flops.forward_flops_terms("Mixer-B_16", 448)
    assert at_448["channel_mixing"] == 4 * terms["channel_mixing"]
    assert at_448["head"] == terms["head"]


def test_train_flops_are_three_forward_passes_less_stem_input_gradient():
    forward = flops.mixer_flops("Mixer-B_16", 224, batch=8)
    stem = 8 * flops.forward_flops_terms("Mixer-B_16", 224)["stem"]
    assert flops.mixer_flops("Mixer-B_16", 224, batch=8, train=True) == 3 * forward - stem
    assert flops.mixer_flops("Mixer-B_16", 224, batch=8) == 8 * flops.mixer_flops("Mixer-B_16")


def test_flops_reject_indivisible_image_size():
    with pytest.raises(ValueError, match="divisible"):
        flops.mixer_flops("Mixer-B_16", 100)


def test_xla_cost_analysis_agrees_with_analytic_count():
    # Wide enough that matmuls dominate (as in every published variant), two blocks
    # so that it compiles in seconds.
    model = models.MlpMixer(patch_size=8, num_blocks=2, hidden_dim=256, tokens_mlp_dim=128,
                            channels_mlp_dim=1024, num_classes=100)
    images, labels = measure.synthetic_batch(model, 4, 64)
    params = models.param_shapes(model, images.shape[1:])
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, images).compile()
    tx = measure.recipe_optimizer("sgd")
    state = jax.eval_shape(functools.partial(steps.init_state, model, tx, image_shape=(64, 64, 3)),
                           jax.random.PRNGKey(0))
    train_step = functools.partial(steps.train_step, model=model, tx=tx)
    batch = {"image": images, "label": labels}
    train = jax.jit(train_step).lower(state, batch).compile()
    forward_ratio = flops.xla_flops(forward) / flops.mixer_flops(model, 64, 4)
    train_ratio = flops.xla_flops(train) / flops.mixer_flops(model, 64, 4, train=True)
    assert 1.0 <= forward_ratio < 1.03, forward_ratio  # XLA adds GELU, norms, adds
    assert 1.0 <= train_ratio < 1.05, train_ratio


@pytest.mark.slow
def test_command_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "results.json"
    results = cli.main(["--variant=Mixer-Ti_4", "--image_size=32", "--batch=4",
                        "--mode=inference,train", "--steps=3", "--ceiling_sizes=128,256",
                        "--statistic=min",
                        f"--json={out}"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert [r["mode"] for r in results["runs"]] == ["inference", "train"]
    for run in results["runs"]:
        train = run["mode"] == "train"
        assert run["flops_per_step"] == flops.mixer_flops("Mixer-Ti_4", 32, 4, train=train)
        assert run["step_s"] == run["min_s"] == min(run["step_times_s"]) <= run["median_s"]
        assert len(run["step_times_s"]) == 3
        assert run["images_per_s"] == pytest.approx(4 / run["min_s"])
        assert run["achieved_flops_per_s"] == pytest.approx(run["flops_per_step"] / run["min_s"])
        # Every size timed 3 times after each of the 3 steps; the fastest size is the ceiling.
        ceiling = run["ceiling"]
        assert ceiling["statistic"] == "min" and ceiling["calls_per_size"] == 9
        assert set(ceiling["by_size"]) == {"128", "256"}
        assert ceiling["flops_per_s"] == max(ceiling["by_size"].values()) > 0
        assert ceiling["by_size"][str(ceiling["size"])] == ceiling["flops_per_s"]
        assert run["of_ceiling"] == pytest.approx(
            run["achieved_flops_per_s"] / ceiling["flops_per_s"])
        assert run["compile_s"] > 0
        assert 0 < run["xla_vs_analytic"] < 0.2  # tiny model: elementwise ops weigh more
        mem = run["memory"]
        # Arguments hold at least the float32 parameters (and, training, Adam's two moments).
        assert mem["argument_bytes"] >= (3 if train else 1) * 4 * run["param_count"]
        assert mem["compiled_peak_bytes"] >= mem["argument_bytes"]
    table = capsys.readouterr().out
    assert "inference ceiling:" in table and "min of 9 calls per size" in table
    assert "of ceiling" in table and "Mixer-Ti_4" in table


def test_command_with_microbatches_and_no_ceiling(capsys):
    results = cli.main(["--variant=Mixer-Ti_4", "--image_size=32", "--batch=4",
                        "--microbatch=2", "--mode=inference,train", "--steps=2",
                        "--ceiling=false"])
    inference, train = results["runs"]
    for run in (inference, train):
        assert run["microbatch"] == 2 and run["ceiling"] is None and run["of_ceiling"] is None
    # Inference unrolls its micro-batches: XLA counts them all.
    assert 0 < inference["xla_vs_analytic"] < 0.2
    # Training accumulates them in a loop whose body XLA counts once: about half.
    assert train["xla_counts_loop_body_once"] and train["xla_vs_analytic"] is None
    assert 0.4 < train["xla_flops_per_step"] / train["flops_per_step"] < 0.6
    table = capsys.readouterr().out
    assert "n/a (loop)" in table and "ceiling:" not in table
    with pytest.raises(ValueError, match="--microbatch=3 does not divide the batch of 4"):
        cli.main(["--variant=Mixer-Ti_4", "--image_size=32", "--batch=4", "--microbatch=3"])


def test_step_pays_for_the_work_it_leaves_running(monkeypatch):
    # A fake clock: the step takes 1.0 s and leaves 0.25 s of work that slows the
    # first matmul after it; a matmul alone takes 0.01 s (n=2) or 0.04 s (n=4).
    clock, tail = [0.0], [0.0]
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])

    def step():
        clock[0] += 1.0
        tail[0] = 0.25

    def matmul(seconds):
        def call():
            clock[0] += seconds + tail[0]
            tail[0] = 0.0
        return call

    step_times, matmul_times = measure.time_with_ceiling(
        step, {2: matmul(0.01), 4: matmul(0.04)}, steps=3, repeats=2)
    assert step_times == pytest.approx([1.25] * 3)
    assert matmul_times == {2: pytest.approx([0.01] * 6), 4: pytest.approx([0.04] * 6)}
    ceiling = measure.ceiling_figures(matmul_times, "float32", "median")
    assert ceiling["size"] == 4 and ceiling["flops_per_s"] == pytest.approx(2 * 4**3 / 0.04)
    # Without matmuls the steps are timed as they are.
    tail[0] = 0.0
    assert measure.time_with_ceiling(step, {}, steps=2) == (pytest.approx([1.0, 1.0]), {})


def test_command_rejects_bad_requests():
    with pytest.raises(ValueError, match="Unknown mode"):
        cli.main(["--mode=inferense"])
    with pytest.raises(ValueError, match="needs --config"):
        cli.main(["--mode=pipeline"])
    with pytest.raises(ValueError, match="Unknown variant"):
        cli.main(["--variant=Mixer-X_9", "--mode=inference"])


def test_recipe_optimizers_are_trainings_own():
    # Adam keeps two moments per parameter, SGD with momentum one.
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones((4,))}
    def state_floats(name):
        state = measure.recipe_optimizer(name).init(params)
        return sum(x.size for x in jax.tree.leaves(state) if x.dtype == jnp.float32)
    assert state_floats("adam") == 2 * 16 and state_floats("sgd") == 16
    with pytest.raises(ValueError, match="Unknown optimizer"):
        measure.recipe_optimizer("lamb")


def abstract_state(variant, strategy, num_devices, image_size, **kw):
    model = models.create_model(variant, scan=True)
    runner = parallel.MeshStrategy(
        model, measure.recipe_optimizer("adam"), image_shape=(image_size, image_size, 3),
        mesh=sharding.mesh_of(num_devices), fsdp=strategy == "fsdp", **kw)
    return runner.abstract_state()


def test_fsdp_holds_an_nth_of_b16_parameters_per_device():
    data = abstract_state("Mixer-B_16", "data", 8, 224).params
    fsdp = abstract_state("Mixer-B_16", "fsdp", 8, 224).params
    total = 4 * sum(math.prod(x.shape) for x in jax.tree.leaves(data))
    assert sharding.bytes_per_device(data) == total
    # Only vectors (norms, biases: 0.16% of the parameters) stay replicated.
    assert total / 8 < sharding.bytes_per_device(fsdp) < 1.02 * total / 8
    blocks = fsdp[models.SCANNED_BLOCKS]["block"]
    channel = blocks["channel_mixing"]["Dense_0"]["kernel"]
    assert channel.sharding.shard_shape(channel.shape) == (12, 768, 384)
    token = blocks["token_mixing"]["Dense_0"]["kernel"]
    assert token.sharding.shard_shape(token.shape) == (12, 196, 48)  # never the 196 tokens


def test_sharding_memory_from_compiled_step():
    common = dict(num_devices=8, batch_per_device=2, image_size=32, optimizer="adam",
                  scan=False, fsdp_min_size=0)
    data = sharding.sharding_memory("Mixer-Ti_4", strategy="data", **common)
    fsdp = sharding.sharding_memory("Mixer-Ti_4", strategy="fsdp", **common)
    # Every Ti_4 dimension divides by 8; replicated stay only the token-mixing output
    # biases (2 blocks x 64 tokens, float32: the token axis is never split) and the
    # optimizer's two int32 step counts (Adam's and the schedule's).
    token_biases = 2 * 64 * 4
    counts = 2 * 4
    assert fsdp["param_bytes"] == (data["param_bytes"] - token_biases) / 8 + token_biases
    assert fsdp["optimizer_bytes"] == (data["optimizer_bytes"] - 2 * token_biases - counts) / 8 \
        + 2 * token_biases + counts
    batch_bytes = 2 * 32 * 32 * 3 * 4 + 2 * 1000 * 4  # images + one-hot labels, per device
    step_and_rng = 4 + 2 * 4  # int32 step, uint32[2] key
    for r in (data, fsdp):  # the compiled arguments are exactly the state + batch
        assert r["argument_bytes"] == (r["param_bytes"] + r["optimizer_bytes"] + step_and_rng
                                       + batch_bytes)
        assert r["total_bytes"] >= r["argument_bytes"]
    with pytest.raises(ValueError, match="Unknown strategy"):
        sharding.sharding_memory("Mixer-Ti_4", strategy="pmap", **common)


PIPELINE_CONFIG = """
import ml_collections

def get_config():
    return ml_collections.ConfigDict({
        "dataset": "sklearn_digits", "tfds_data_dir": %r, "batch": 16,
        "shuffle_buffer": 64, "seed": 0, "model_name": "Mixer-Ti_4",
        "pp": {"train": "train", "test": "test", "crop": 8, "resize": None,
               "inception_crop": False, "flip": False, "randaugment": None},
    })
"""


@pytest.mark.slow
def test_pipeline_mode_reports_throughput(tmp_path, capsys):
    pytest.importorskip("mixer_jax.input_pipeline")
    config = tmp_path / "digits.py"
    config.write_text(PIPELINE_CONFIG % str(tmp_path / "tfds"))
    results = cli.main([f"--config={config}", "--config.batch=8", "--mode=pipeline",
                        "--pipeline_batches=5"])
    (result,) = results["pipeline"]
    assert result["dataset"] == "sklearn_digits"
    assert result["host_batch"] == 8 and result["crop"] == 8
    assert result["images_per_s"] == pytest.approx(8 / result["batch_s"]) and result["batch_s"] > 0
    assert "input pipeline" in capsys.readouterr().out


def test_flops_come_from_the_family():
    model = models.create_model("Mixer-Ti_4", num_classes=10)
    assert flops.forward_flops_terms(model, (32, 16)) == models.get_family("mixer").flops(
        model, (32, 16))
    assert flops.model_flops is flops.mixer_flops
    with pytest.raises(ValueError, match="not the module of a registered family"):
        models.registry.family_of(object())


@pytest.mark.slow
def test_compare_timm_runs_both_frameworks_alternately():
    pytest.importorskip("timm")
    results = cli.main(["--variant=Mixer-Ti_4", "--image_size=32", "--batch=2", "--steps=2",
                        "--mode=inference", "--compare=timm", "--timm_model=mixer_s16_224",
                        "--compare_rounds=2"])
    (row,) = results["compare"]
    assert row["timm_name"] == "mixer_s16_224" and row["rounds"] == 2
    assert len(row["mixer_jax_step_times_s"]) == len(row["timm_step_times_s"]) == 4
    assert row["ratio"] == pytest.approx(row["mixer_jax_images_per_s"] / row["timm_images_per_s"])
    assert not results["runs"]  # the comparison replaces the in-process run


def test_staged_models_build_without_a_scanned_layout():
    # Staged families (MetaFormer, Sequencer2D) have no `scan` field: the benchmark builds
    # them unrolled (sharding mode's default scan falls back) and refuses an explicit --scan.
    assert measure.scannable("gmlp_s16_224") and not measure.scannable("poolformer_s12")
    model = measure.build_model("convformer_s18", dtype="bfloat16", scan=False, remat=True)
    assert model.remat and model.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="poolformer has no scanned layout"):
        measure.build_model("poolformer_s12", dtype="float32", scan=True, remat=False)
