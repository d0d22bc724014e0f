"""Sequencer2D: the LSTM against torch, counts, timm key maps, logits parity, intermediates.

Parity tests build timm's model with each name's architecture but one block per stage
(`layers=(1, 1, 1, 1)` on both sides) at small inputs, to fit the test budget.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mixer_jax import models
from mixer_jax.models import sequencer

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

# timm 1.0.31: sum(p.numel() for p in timm.create_model(name).parameters())
TIMM_COUNTS = {"sequencer2d_s": 27_651_688, "sequencer2d_m": 38_307_688,
               "sequencer2d_l": 54_298_216}
FAMILY = models.get_family("sequencer")
SHALLOW = (1, 1, 1, 1)


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def _torch(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def test_lstm_matches_torch_bidirectional():
    """One bidirectional layer, both directions, against torch.nn.LSTM on its weights."""
    torch.manual_seed(0)
    n, t, c, hid = 3, 7, 5, 4
    ref = torch.nn.LSTM(c, hid, batch_first=True, bidirectional=True)
    x = torch.randn(n, t, c)
    with torch.no_grad():
        want = ref(x)[0].numpy()  # [N, T, 2H]: forward, reverse
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    dirs = ("l0", "l0_reverse")
    w_ih = np.stack([sd[f"weight_ih_{d}"].T for d in dirs])
    w_hh = np.stack([sd[f"weight_hh_{d}"].T for d in dirs])
    bias = np.stack([sd[f"bias_ih_{d}"] + sd[f"bias_hh_{d}"] for d in dirs])
    gx = jnp.einsum("ntc,dck->tndk", x.numpy(), w_ih) + bias
    got = sequencer.lstm_scan(gx, jnp.asarray(w_hh))  # [T, N, 2, H]
    got = np.transpose(np.asarray(got), (1, 0, 2, 3)).reshape(n, t, 2 * hid)
    assert _rel_err(got[..., :hid], want[..., :hid]) < 1e-5
    assert _rel_err(got[..., hid:], want[..., hid:]) < 1e-5


@pytest.mark.parametrize("name", [
    "sequencer2d_s", pytest.param("sequencer2d_m", marks=pytest.mark.slow),
    pytest.param("sequencer2d_l", marks=pytest.mark.slow)])
def test_count_keys_and_shapes_equal_timm(name):
    """Our parameter count is timm's; to_timm of our abstract shapes gives timm's real
    state_dict keys and shapes (meta device); the architecture read back is the variant's."""
    shapes = _flat(models.param_shapes(models.create_model(name), (14, 14, 3)))
    assert sum(int(np.prod(v.shape)) for v in shapes.values()) == TIMM_COUNTS[name]
    flat = {k: np.broadcast_to(np.zeros((), np.float32), v.shape) for k, v in shapes.items()}
    assert FAMILY.architecture(flat) == dict(FAMILY.variants[name])
    with torch.device("meta"):
        ref = timm.create_model(name).state_dict()
    ours = FAMILY.to_timm(flat)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


def _shallow_timm(name):
    """timm's model of `name` with one block per stage. (timm's sequencer2d_m/l
    entrypoints reject a `layers` override: they pass **kwargs twice. So the class is built
    from the variant's fields, which the test above checks against timm's entrypoints.)"""
    fields = {k: list(v) for k, v in FAMILY.variants[name].items()}
    return timm.models.sequencer.Sequencer2d(**{**fields, "layers": list(SHALLOW)}).eval()


@functools.lru_cache(maxsize=None)
def _random_timm(name):
    """`_shallow_timm(name)` with its weights moved off their init."""
    torch.manual_seed(0)
    model = _shallow_timm(name)
    with torch.no_grad():  # move norms, biases and the zero-initialised head off their init
        for k, p in model.named_parameters():
            if p.ndim == 1 or k.startswith("head"):
                p.add_(0.2 * torch.randn_like(p))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, sd, traverse_util.unflatten_dict(FAMILY.from_timm(sd), sep="/")


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, x):
    return model.apply({"params": params}, x, return_intermediates=True)


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [
    ("sequencer2d_s", (28, 42)), ("sequencer2d_s", (28, 28)),  # two scans; one scan of four
    ("sequencer2d_m", (28, 42)), ("sequencer2d_l", (28, 42))])
def test_logits_parity_with_timm_both_ways(name, size):
    """timm -> ours: logits and every intermediate equal timm's; ours -> timm: bitwise the
    same state dict, loaded strictly, the same logits. (At one block per stage the three
    names build the same model: they differ only in depth.)"""
    ref, sd, params = _random_timm(name)
    model = models.create_model(name, layers=SHALLOW)
    x = np.random.default_rng(0).normal(size=(2, *size, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(_torch(x)).numpy()
        final, inter = ref.forward_intermediates(_torch(x), output_fmt="NHWC")
        stem, pooled = ref.stem(_torch(x)).numpy(), ref.forward_head(final, pre_logits=True).numpy()
    got, feats = _forward(model, params, jnp.asarray(x))
    assert _rel_err(got, want) < 1e-4
    assert _rel_err(feats["stem"], stem) < 1e-5
    for i, t in enumerate(inter):
        assert _rel_err(feats[f"stage_{i}"], t.numpy()) < 1e-4
    assert _rel_err(feats["pre_logits"], pooled) < 1e-4

    back = FAMILY.to_timm(_flat(params))
    assert set(back) == set(sd)
    assert all(back[k].dtype == v.dtype and np.array_equal(back[k], v) for k, v in sd.items())
    fresh = _shallow_timm(name)
    fresh.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in back.items()},
                          strict=True)
    with torch.no_grad():
        assert np.array_equal(fresh(_torch(x)).numpy(), want)


def test_conversion_names_bad_keys():
    model = models.create_model("sequencer2d_s", layers=SHALLOW)
    flat = {k: np.zeros(v.shape, np.float32)
            for k, v in _flat(models.param_shapes(model, (14, 14, 3))).items()}
    sd = FAMILY.to_timm(flat)
    assert _flat(traverse_util.unflatten_dict(FAMILY.from_timm(sd), sep="/")).keys() == flat.keys()
    with pytest.raises(ValueError, match="stages.0.blocks.0.norm1.bogus"):
        FAMILY.from_timm({**sd, "stages.0.blocks.0.norm1.bogus": sd["norm.bias"]})
    with pytest.raises(ValueError, match="rnn_h/bias_hh_l0_reverse' is missing"):
        FAMILY.from_timm({k: v for k, v in sd.items()
                          if k != "stages.2.blocks.0.rnn_tokens.rnn_h.bias_hh_l0_reverse"})
    with pytest.raises(ValueError, match="'stem.proj.weight' has shape"):
        FAMILY.from_timm({**sd, "stem.proj.weight": np.zeros((192, 3, 5, 7), np.float32)})
    with pytest.raises(ValueError, match="Not a Sequencer2D"):
        FAMILY.architecture({"MixerBlock_0/LayerNorm_0/scale": np.zeros(3)})


@pytest.mark.parametrize("size", [224, pytest.param(256, marks=pytest.mark.slow)])
def test_intermediates_shapes_equal_timm(size):
    """'stem' and the stage outputs (NHWC) at 224 and 256 against timm's stem and
    forward_intermediates on the meta device (256 is no multiple of the stem's 7: both
    floor to a 36x36 map)."""
    model = models.create_model("sequencer2d_s", layers=SHALLOW, num_classes=None)
    shapes = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, return_intermediates=True)[0][1],
        jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
    with torch.device("meta"):
        ref = timm.create_model("sequencer2d_s", layers=list(SHALLOW))
        x = torch.zeros(2, 3, size, size)
        stem = ref.stem(x)
        _, inter = ref.forward_intermediates(x, output_fmt="NHWC")
    assert shapes["stem"].shape == tuple(stem.shape)
    assert [shapes[f"stage_{i}"].shape for i in range(4)] == [tuple(t.shape) for t in inter]
    assert shapes["pre_logits"].shape == (2, 384)


@pytest.mark.slow
def test_remat_and_stochastic_depth():
    """remat changes nothing; timm gives every block the same drop_path_rate, so at rate 1
    every residual branch is dropped in training and the stages reduce to their
    downsamplings (stage 0 to the stem)."""
    _, _, params = _random_timm("sequencer2d_s")
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 28, 28, 3)), jnp.float32)
    plain = models.create_model("sequencer2d_s", layers=SHALLOW)
    remat = models.create_model("sequencer2d_s", layers=SHALLOW, remat=True)
    np.testing.assert_allclose(_forward(remat, params, x)[0], _forward(plain, params, x)[0],
                               rtol=1e-6, atol=1e-6)
    model = models.create_model("sequencer2d_s", layers=SHALLOW, stoch_depth=1.0)
    _, feats = model.apply({"params": params}, x, train=True, return_intermediates=True,
                           rngs={"dropout": jax.random.key(0)})
    p = params["stages_1"]["downsample"]
    down = jax.lax.conv_general_dilated(
        feats["stage_0"], p["kernel"], (2, 2), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
    np.testing.assert_array_equal(feats["stage_0"], feats["stem"])
    np.testing.assert_allclose(feats["stage_1"], down, rtol=1e-5, atol=1e-5)


def test_too_small_image_is_refused():
    model = models.create_model("sequencer2d_s", layers=SHALLOW)
    with pytest.raises(ValueError, match="at least 14 pixels"):
        models.param_shapes(model, (13, 28, 3))


@pytest.mark.slow
def test_flops_match_xla():
    """Analytic FLOPs vs XLA's count of the compiled forward pass, the scans fully
    unrolled (XLA counts a loop body once), on a non-square input (stages 1-3 square)."""
    model = models.create_model("sequencer2d_s", layers=SHALLOW, unroll=True)
    params = models.param_shapes(model, (28, 42, 3))
    x = jax.ShapeDtypeStruct((1, 28, 42, 3), jnp.float32)
    xla = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(
        params, x).compile().cost_analysis()["flops"]
    ours = FAMILY.flops(model, (28, 42))
    assert ours["lstm_recurrent"] > 0 and ours["stem"] > 0
    assert abs(sum(ours.values()) - xla) / xla < 0.05
