"""The MetaFormer line: counts, timm keys and logits, the official IdentityFormer /
RandFormer layout, intermediates, RandFormer's frozen matrices, sizes, FLOPs.

Logits parity runs each name's architecture with one block per stage (timm's
`depths=` through `MetaFormer(**variant kwargs)`, ours through `create_model(name,
depths=...)`) at 64x64 to fit the time budget; the full-depth key sets and shapes are
checked on timm's meta device. IdentityFormer / RandFormer are not in timm: their
reference is a forward pass written here from the official code's definition
(sail-sg/metaformer, `metaformer_baselines.py`), on weights in its key layout.
"""
from __future__ import annotations

import functools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixer_jax import models
from mixer_jax.models import metaformer as mf
from mixer_jax.models import metaformer_keys as keys

DEPTHS = (1, 1, 1, 1)
SIZE = 64
# Parameter counts: timm 1.0.31 (`sum(p.numel() for p in model.parameters())`); for
# IdentityFormer / RandFormer the official code's (RandFormer: trainable + frozen matrices,
# the README's "11.9 + 0.2M").
COUNTS = {
    "poolformer_s12": 11915176, "poolformer_s24": 21388968, "poolformer_s36": 30862760,
    "poolformer_m36": 56172520, "poolformer_m48": 73473448,
    "poolformerv2_s12": 11891712, "poolformerv2_s24": 21341464, "poolformerv2_s36": 30791216,
    "poolformerv2_m36": 56077168, "poolformerv2_m48": 73346056,
    "convformer_s18": 26774448, "convformer_s36": 40012152, "convformer_m36": 57051640,
    "convformer_b36": 99882616,
    "caformer_s18": 26341656, "caformer_s36": 39297102, "caformer_m36": 56204878,
    "caformer_b36": 98753614,
    "identityformer_s12": 11891712, "identityformer_s24": 21341464,
    "identityformer_s36": 30791216, "identityformer_m36": 56077168,
    "identityformer_m48": 73346056,
    "randformer_s12": 11891712 + 235298, "randformer_s24": 21341464 + 470596,
    "randformer_s36": 30791216 + 705894, "randformer_m36": 56077168 + 705894,
    "randformer_m48": 73346056 + 941192,
}
FROZEN_COUNTS = {"randformer_s12": 235298, "randformer_s24": 470596, "randformer_s36": 705894,
                 "randformer_m36": 705894, "randformer_m48": 941192}
TIMM_NAMES = [n for n in COUNTS if n.rsplit("_", 1)[0] in mf.TIMM_LINES]
OFFICIAL_NAMES = [n for n in COUNTS if n not in TIMM_NAMES]
SMALL = ["poolformer_s12", "caformer_s18", "randformer_s12"]  # the quick subset


def _distinct_at_reduced_depth(names):
    """One name per (line, widths): at DEPTHS the others are the same model (their full
    depths are checked by the count and key tests)."""
    seen, out = set(), []
    for name in names:
        key = (name.rsplit("_", 1)[0], tuple(mf.VARIANTS[name]["dims"]))
        if key not in seen:
            seen.add(key)
            out.append(name)
    return out


def _slow_unless(names):
    return [n if n in names else pytest.param(n, marks=pytest.mark.slow) for n in COUNTS]


@functools.lru_cache(maxsize=None)
def _abstract(name: str):
    model = models.create_model(name)
    return jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0),
                                                      jnp.zeros((1, 224, 224, 3)))))


@functools.lru_cache(maxsize=None)
def _jitted(model):
    """One compiled forward per distinct module (names with equal reduced models share)."""
    return jax.jit(functools.partial(model.apply, return_intermediates=True))


def _rel(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _images(seed=0, size=SIZE):
    return np.random.RandomState(seed).randn(2, size, size, 3).astype(np.float32)


def _perturb_torch(model, seed):
    """Weights far from init: norms/scales around 1, biases around 0, layers ~ 1/sqrt(fan-in)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("random_matrix"):
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1:
                p.copy_(1 + 0.3 * noise if name.endswith(("weight", "scale")) else 0.3 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model.eval()


def _shake(flat, seed):
    """Our side's own non-trivial weights: every parameter moved by 10% noise."""
    rng = np.random.RandomState(seed)
    return {k: (v + 0.1 * np.abs(v).mean() * rng.randn(*v.shape)).astype(v.dtype)
            if not k.endswith("random_matrix") else v for k, v in flat.items()}


# --------------------------------------------------------------------------- timm side

def _timm_model(name, depths=None):
    """timm's model for `name`, optionally with other depths (its variants fix them)."""
    import timm.models.metaformer as tm
    kwargs = {}
    with mock.patch.object(tm, "_create_metaformer",
                           lambda variant, pretrained=False, **kw: kwargs.update(kw)):
        getattr(tm, name)()
    if depths is not None:
        kwargs["depths"] = depths
    return tm.MetaFormer(**kwargs)


def _torch_forward(model, images):
    import torch
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2))
        final, stages = model.forward_intermediates(x)
        return model.forward_head(final).numpy(), [s.numpy().transpose(0, 2, 3, 1)
                                                   for s in stages]


@pytest.mark.parametrize("name", _slow_unless(SMALL))
def test_param_counts_and_timm_keys(name):
    """Counts equal timm's (official code's); to_timm of our shapes is timm's key set."""
    variables = _abstract(name)
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    assert count(variables["params"]) + count(variables.get(mf.FROZEN, {})) == COUNTS[name]
    assert count(variables.get(mf.FROZEN, {})) == FROZEN_COUNTS.get(name, 0)
    if name not in TIMM_NAMES:
        return
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    with torch.device("meta"):
        reference = _timm_model(name).state_dict()
    zeros = {k: np.broadcast_to(np.zeros((), np.float32), v.shape)
             for k, v in mf._flat(variables["params"]).items()}
    ours = keys.flat_to_timm(zeros)  # the key map alone (parity tests cover its checks)
    assert sorted(ours) == sorted(reference)
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}


@pytest.mark.parametrize("name", [n if n == "caformer_s18"
                                  else pytest.param(n, marks=pytest.mark.slow)
                                  for n in _distinct_at_reduced_depth(TIMM_NAMES)])
def test_timm_parity_both_directions(name):
    """timm -> ours and ours -> timm: same logits and stage maps (reduced depths, 64x64)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    family = models.get_family(name)
    torch.manual_seed(0)
    reference = _perturb_torch(_timm_model(name, DEPTHS), seed=1)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    flat = family.from_timm(state)
    model = models.create_model(name, depths=DEPTHS)
    # The shapes give the architecture; an init value (v1's layer scale) is not in weights.
    fields = family.architecture(flat) | {"layer_scale_init": model.layer_scale_init}
    assert mf.MetaFormer(**fields) == model
    images = _images()
    logits, feats = _jitted(model)({"params": mf._nest(flat)}, images)
    expected, stages = _torch_forward(reference, images)
    assert _rel(logits, expected) < 1e-4
    for i, stage in enumerate(stages):
        assert _rel(feats[f"stage_{i}"], stage) < 1e-4

    # Back: our own weights -> to_timm -> a fresh timm model (strict) -> the same logits.
    shaken = _shake(flat, seed=2)
    ours, _ = _jitted(model)({"params": mf._nest(shaken)}, images)
    fresh = _timm_model(name, DEPTHS)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in family.to_timm(shaken).items()},
                          strict=True)
    assert _rel(ours, _torch_forward(fresh.eval(), images)[0]) < 1e-4
    assert all(np.array_equal(v, state[k]) and v.dtype == state[k].dtype
               for k, v in family.to_timm(flat).items())


@pytest.mark.parametrize("size", [224, 256, pytest.param(100, marks=pytest.mark.slow)])
def test_intermediates_match_timm_forward_intermediates(size):
    """'stem', 'stage_i' (NHWC) and 'pre_logits' shapes; the stages as timm's (meta device)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    model = models.create_model("caformer_s18", depths=DEPTHS)
    variables = _abstract_small(model, size)
    _, feats = jax.eval_shape(functools.partial(model.apply, return_intermediates=True),
                              variables, jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
    with torch.device("meta"):
        _, stages = _timm_model("caformer_s18", DEPTHS).forward_intermediates(
            torch.empty(2, 3, size, size))
    assert sorted(feats) == ["pre_logits", "stage_0", "stage_1", "stage_2", "stage_3", "stem"]
    for i, stage in enumerate(stages):
        b, c, h, w = stage.shape
        assert feats[f"stage_{i}"].shape == (b, h, w, c)
    assert feats["stem"].shape == feats["stage_0"].shape
    assert feats["pre_logits"].shape == (2, 512)


def _abstract_small(model, size):
    return jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0),
                                                      jnp.zeros((1, size, size, 3)))))


def test_stochastic_depth_schedule_is_timms():
    """Linear from 0 to the rate over all blocks of all stages, as timm's drop_path_rate."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    rates = models.create_model("convformer_s36", stoch_depth=0.3).drop_rates()
    with torch.device("meta"):
        reference = timm.create_model("convformer_s36", drop_path_rate=0.3)
    expected = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0
                for stage in reference.stages for b in stage.blocks]
    assert [len(r) for r in rates] == [3, 12, 18, 3]
    assert np.concatenate(rates).tolist() == pytest.approx(expected)


def test_timm_conversion_names_the_bad_key():
    family = models.get_family("poolformer_s12")
    with pytest.raises(ValueError, match="stages.0.blocks.0.bogus"):
        family.from_timm({"stages.0.blocks.0.bogus.weight": np.zeros(3)})
    flat = {k: np.zeros(v.shape, v.dtype) for k, v in
            mf._flat(_abstract_small(models.create_model("poolformer_s12", depths=DEPTHS),
                                     32)["params"]).items()}
    state = family.to_timm(flat)
    del state["stages.2.blocks.0.mlp.fc2.bias"]
    with pytest.raises(ValueError, match="stages_2_blocks_0/fc2/bias"):
        family.from_timm(state)


# --------------------------------------------------------------- official code (reference)

def _official_module(depths, dims, mixers, num_tokens):
    """IdentityFormer / RandFormer as sail-sg/metaformer's `metaformer_baselines.py` defines
    them: [B, H, W, C] blocks, LayerNormGeneral over (H, W, C) without bias (eps 1e-6), Linear
    MLPs with StarReLU, res scale 1.0 in stages 3-4, pre/post-norm conv downsampling, mean ->
    LayerNorm (eps 1e-6) -> Linear. Its key names are the official checkpoints'."""
    import torch
    from torch import nn

    class GeneralNorm(nn.Module):  # LayerNormGeneral(affine C, dims, bias=False, eps=1e-6)
        def __init__(self, dim, dims=(-1,)):
            super().__init__()
            self.dims, self.weight = dims, nn.Parameter(torch.ones(dim))

        def forward(self, x):
            c = x - x.mean(self.dims, keepdim=True)
            return c / torch.sqrt(c.pow(2).mean(self.dims, keepdim=True) + 1e-6) * self.weight

    class Scale(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            return x * self.scale

    class StarReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale, self.bias = nn.Parameter(torch.ones(1)), nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.scale * torch.relu(x) ** 2 + self.bias

    class RandomMixing(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.random_matrix = nn.Parameter(torch.softmax(torch.rand(n, n), dim=-1),
                                              requires_grad=False)

        def forward(self, x):
            b, h, w, c = x.shape
            return torch.einsum("mn,bnc->bmc", self.random_matrix,
                                x.reshape(b, h * w, c)).reshape(b, h, w, c)

    class Mlp(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.fc1, self.act = nn.Linear(dim, 4 * dim, bias=False), StarReLU()
            self.fc2 = nn.Linear(4 * dim, dim, bias=False)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self, dim, mixer, res_scale):
            super().__init__()
            self.norm1 = GeneralNorm(dim, (1, 2, 3))
            self.token_mixer = RandomMixing(num_tokens[mixer]) if mixer != "identity" \
                else nn.Identity()
            self.norm2, self.mlp = GeneralNorm(dim, (1, 2, 3)), Mlp(dim)
            if res_scale:
                self.res_scale1, self.res_scale2 = Scale(dim), Scale(dim)

        def forward(self, x):
            r1 = getattr(self, "res_scale1", nn.Identity())
            r2 = getattr(self, "res_scale2", nn.Identity())
            x = r1(x) + self.token_mixer(self.norm1(x))
            return r2(x) + self.mlp(self.norm2(x))

    class Downsampling(nn.Module):
        def __init__(self, cin, cout, first):
            super().__init__()
            if first:
                self.conv = nn.Conv2d(cin, cout, 7, stride=4, padding=2)
                self.post_norm = GeneralNorm(cout)
            else:
                self.pre_norm = GeneralNorm(cin)
                self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)

        def forward(self, x):  # stem: NCHW in; later ones: NHWC in; NHWC out
            if hasattr(self, "pre_norm"):
                x = self.pre_norm(x).permute(0, 3, 1, 2)
            x = self.conv(x).permute(0, 2, 3, 1)
            return self.post_norm(x) if hasattr(self, "post_norm") else x

    class Official(nn.Module):
        def __init__(self):
            super().__init__()
            chans = (3, *dims)
            self.downsample_layers = nn.ModuleList(
                Downsampling(chans[i], chans[i + 1], i == 0) for i in range(len(dims)))
            self.stages = nn.ModuleList(
                nn.Sequential(*[Block(dims[i], mixers[i], i >= 2) for _ in range(depths[i])])
                for i in range(len(dims)))
            self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
            self.head = nn.Linear(dims[-1], 1000)

        def forward(self, x):
            for down, stage in zip(self.downsample_layers, self.stages):
                x = stage(down(x))
            return self.head(self.norm(x.mean([1, 2])))

    return Official().eval()


@pytest.mark.parametrize("name", [n if n == "randformer_s12"
                                  else pytest.param(n, marks=pytest.mark.slow)
                                  for n in _distinct_at_reduced_depth(OFFICIAL_NAMES)])
def test_official_layout_parity_both_directions(name):
    """Official key layout -> from_official -> our logits; ours -> to_official -> official."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    reference = _perturb_torch(_official_reference(name, DEPTHS, SIZE), seed=3)
    state = reference.state_dict()
    variables = mf.from_official(state)
    model = models.create_model(name, depths=DEPTHS)
    images = _images()
    logits, _ = _jitted(model)(variables, images)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    assert _rel(logits, expected) < 1e-4

    shaken = dict(variables, params=mf._nest(_shake(mf._flat(variables["params"]), seed=4)))
    ours, _ = _jitted(model)(shaken, images)
    fresh = _official_reference(name, DEPTHS, SIZE)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in mf.to_official(shaken).items()},
                          strict=True)
    with torch.no_grad():
        back = fresh(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    assert _rel(ours, back) < 1e-4


def _official_reference(name, depths, size):
    fields = mf.VARIANTS[name]
    side = mf.feature_sizes((7, 4, 2), fields["dims"], size)
    # The official RandFormer fixes 196 and 49 tokens (224x224); here the stage sizes of `size`.
    mixers = tuple(m if m != "random" else f"random{i}"
                   for i, m in enumerate(fields["token_mixers"]))
    tokens = {f"random{i}": side[i] ** 2 for i in range(4)}
    return _official_module(depths, fields["dims"], mixers, tokens)


def test_official_reference_counts():
    """The reference written here has the official code's parameter counts (full depth)."""
    torch = pytest.importorskip("torch")
    for name in ("identityformer_s12", "randformer_m48"):
        with torch.device("meta"):
            reference = _official_reference(name, mf.VARIANTS[name]["depths"], 224)
        assert sum(p.numel() for p in reference.parameters()) == COUNTS[name]


# ----------------------------------------------------------------- RandFormer, sizes, FLOPs

def test_randformer_matrices_are_frozen():
    """Not in params (so gradients, optimizers, weight decay never see them); required."""
    model = models.create_model("randformer_s12", dims=(8, 16, 32, 32), depths=DEPTHS,
                                num_classes=3)
    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert not any("random_matrix" in k for k in mf._flat(variables["params"]))
    frozen = mf._flat(variables[mf.FROZEN])
    assert sorted(frozen) == ["stages_2_blocks_0/token_mixer/random_matrix",
                              "stages_3_blocks_0/token_mixer/random_matrix"]
    assert frozen["stages_2_blocks_0/token_mixer/random_matrix"].shape == (4, 4)
    np.testing.assert_allclose(frozen["stages_2_blocks_0/token_mixer/random_matrix"].sum(-1),
                               1.0, rtol=1e-6)

    images = jnp.asarray(_images(size=32))
    with pytest.raises(ValueError, match="frozen mixing matrices are missing"):
        jax.eval_shape(model.apply, {"params": variables["params"]}, images)


@pytest.mark.slow
def test_randformer_train_step_leaves_matrices_alone():
    """A jitted AdamW step (weight decay on) moves the params; the matrices are not its input."""
    model = models.create_model("randformer_s12", dims=(8, 16, 32, 32), depths=DEPTHS,
                                num_classes=3)
    variables = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    frozen = jax.tree.map(np.array, variables[mf.FROZEN])
    tx = optax.adamw(1e-2, weight_decay=0.5)
    images, labels = jnp.asarray(_images(size=32)), jnp.array([0, 2])

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            logits = model.apply({"params": p, mf.FROZEN: variables[mf.FROZEN]}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, _ = step(variables["params"], tx.init(variables["params"]))
    assert not np.allclose(params["stem_conv"]["kernel"], variables["params"]["stem_conv"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, variables[mf.FROZEN], frozen)
    assert jax.tree.structure(params) == jax.tree.structure(variables["params"])


def test_input_sizes():
    """Any size the convs reach (timm's rounding); too small or a RandFormer at another size: a
    clear error."""
    model = models.create_model("poolformer_s12", depths=DEPTHS)
    variables = _abstract_small(model, 64)
    apply = lambda v, size: jax.eval_shape(model.apply, v, jnp.zeros((1, size, size + 8, 3)))
    assert apply(variables, 40).shape == (1, 1000)
    with pytest.raises(ValueError, match="too small"):
        apply(variables, 2)
    rand = models.create_model("randformer_s12", depths=DEPTHS)
    rand_vars = _abstract_small(rand, 64)
    with pytest.raises(ValueError, match="mixes 16 tokens.*5x5 = 25"):
        jax.eval_shape(rand.apply, rand_vars, jnp.zeros((1, 72, 72, 3)))


@pytest.mark.parametrize("overrides,size", [
    (dict(depths=(1, 1, 2, 1)), 224),
    # Neighbouring stages of one width: timm does not downsample between them.
    (dict(depths=(1, 1, 1, 1), dims=(64, 64, 320, 320)), 64)], ids=["s18", "repeated_widths"])
def test_flops_match_xla(overrides, size):
    """Analytic FLOPs within 2% of XLA's count (CAFormer: convs, SepConv, attention, MLP
    head), and the stage sizes they assume are the model's."""
    model = models.create_model("caformer_s18", **overrides)
    variables = _abstract_small(model, size)
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    lowered = jax.jit(model.apply).lower(variables, image)
    _, feats = jax.eval_shape(
        functools.partial(model.apply, return_intermediates=True), variables, image)
    assert [feats[f"stage_{i}"].shape[1] for i in range(4)] == mf.feature_sizes(
        model.stem, model.dims, size)
    terms = models.get_family("caformer_s18").flops(model, (size, size))
    assert set(terms) == {"stem", "downsample", "token_mixer", "mlp", "head"}
    assert sum(terms.values()) == pytest.approx(lowered.cost_analysis()["flops"], rel=0.02)


@pytest.mark.slow
def test_remat_equals_plain_and_pooling_has_gradients():
    """Per-block remat changes memory, not numbers (gradients through pooling included)."""
    kwargs = dict(dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_classes=3)
    plain = models.create_model("poolformer_s12", **kwargs)
    params = models.init_params(plain, jax.random.key(0), (32, 32, 3))
    images = jnp.asarray(_images(size=32))

    def grads(model):
        loss = lambda p: jnp.sum(model.apply({"params": p}, images) ** 2)
        return jax.jit(jax.grad(loss))(params)

    ours, rematted = grads(plain), grads(models.create_model("poolformer_s12", remat=True,
                                                             **kwargs))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 ours, rematted)
    assert float(jnp.abs(ours["stages_0_blocks_0"]["norm1"]["scale"]).sum()) > 0


def test_depthwise_conv_formulations_agree():
    """The CPU form (shifted copies, hand-written gradient) equals the grouped conv used on
    other backends, in value and in both gradients (with a non-square image)."""
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 9, 6, 5).astype(np.float32))
    kernel = jnp.asarray(rng.randn(7, 7, 1, 5).astype(np.float32))
    probe = jnp.asarray(rng.randn(2, 9, 6, 5).astype(np.float32))

    def value_and_grads():
        loss = lambda x, k: jnp.sum(mf.depthwise_conv(x, k) * probe)
        return mf.depthwise_conv(x, kernel), jax.grad(loss, argnums=(0, 1))(x, kernel)

    shifted, shifted_grads = value_and_grads()
    with mock.patch.object(jax, "default_backend", lambda: "gpu"):
        grouped, grouped_grads = value_and_grads()
    np.testing.assert_allclose(shifted, grouped, rtol=1e-5, atol=1e-5)
    for ours, reference in zip(shifted_grads, grouped_grads):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)
    assert shifted.shape == x.shape
