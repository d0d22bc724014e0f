"""Parallel strategies: how the pure steps of `steps.py` run on devices and hosts.

`make_strategy(config, model, tx)` picks one from `config.parallelism`:
- 'pmap': the original implementation's data parallelism. Every local device
  holds a copy of the state (leading device axis); gradients are averaged
  with `pmean`.
- 'data': `jax.jit` over a ('data', 'model') device mesh; parameters and
  optimizer state replicated over 'data', the batch split over it.
- 'fsdp': as 'data', but each parameter (and its optimizer state) is also
  split over 'data' along its largest divisible dimension, so every device
  stores 1/N of the model; arrays smaller than `config.fsdp_min_size`
  elements stay replicated, and some logical axes are never split
  (`_FSDP_NEVER`).
With `config.mesh_model = M > 1` (mesh strategies only) every "mlp" / "heads"
axis (the hidden width of an MLP, attention heads) is split over the 'model'
axis (Megatron style: the first Dense's output and the second's input).

Sharding is decided from the logical axis names every family declares on its
parameters (`models.param_axes`, names from `models.registry.AXES`) and their
shapes, by the rules of `partition_spec`; no family's parameter names appear
here. Optimizer-state leaves take the axes of the parameter they mirror. A
dimension that does not divide the mesh axis is simply replicated, and so are the
model's constants (`TrainState.constants`, e.g. RandFormer's frozen matrices). The
state is then created directly in its sharding (`jit(init, out_shardings=...)`), so
no host ever holds a whole large model.

Multi-host: call `maybe_initialize_distributed()` first; each host then feeds
its own part of the batch to `put_batch` (`config.batch // process_count()`
examples) and all hosts run the same steps.
"""
from __future__ import annotations

import abc
import collections
import functools
import itertools
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixer_jax import mix, models, steps

PARALLELISMS = ("pmap", "data", "fsdp")
DATA_AXIS, MODEL_AXIS = "data", "model"
PMAP_AXIS = "batch"
DEFAULT_FSDP_MIN_SIZE = 2**16  # elements; below this, sharding costs more than it saves

# Logical axes split over the 'model' mesh axis (Megatron style).
_MODEL_AXES = ("mlp", "heads")
# Logical axes FSDP never splits. "tokens": splitting a fixed token count (Mixer's
# token MLP, ...) made XLA split the activations by token, i.e. the images by space,
# and replicate whole batches to get there (Mixer-H/14 on 256 devices: 2.4 TiB of
# temporaries per device instead of 45 GiB). "layers": the stacked block axis of
# scanned layouts. "kernel"/"channels": a conv's spatial extent and a stem's 3 image
# channels, too small to be worth it.
_FSDP_NEVER = ("tokens", "layers", "kernel", "channels", "scalar")


# --------------------------------------------------------------------------
# Multi-host start-up.

def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """Name of a multi-process launch found in the environment ('slurm', 'ompi',
    'tpu'), or None for a single process. Cheap: reads environment variables only."""
    env = os.environ if environ is None else environ

    def count(name):
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1

    if count("SLURM_NTASKS") > 1 and "SLURM_STEP_NODELIST" in env:
        return "slurm"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "tpu"
    return None


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: int | list[int] | None = None,
    force: bool = False,
    environ: Mapping[str, str] | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` when this is one of several processes.

    Explicit arguments win; missing ones are read from the environment
    variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    Without any of them, SLURM / Open MPI / multi-host TPU launches are
    detected (see `detect_cluster`) and left to jax's own auto-detection;
    `force=True` calls it regardless (e.g. on a Cloud TPU VM pod slice where
    only the metadata server knows the topology). Must run before any other
    jax call. Returns True when the distributed runtime is initialized.
    """
    env = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if num_processes == 1 and not force:
        return False
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not (explicit or force or detect_cluster(env)):
        return False
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id, local_device_ids=local_device_ids
    )
    return True


# --------------------------------------------------------------------------
# Sharding rules.

def make_mesh(model_size: int = 1, devices=None) -> Mesh:
    """A ('data', 'model') mesh over all (global) devices, 'model' of `model_size`.

    Axes are Auto, i.e. XLA propagates shardings inside jit (pjit style).
    """
    devices = jax.devices() if devices is None else list(devices)
    if model_size < 1 or len(devices) % model_size:
        raise ValueError(
            f"mesh_model={model_size} must divide the number of devices ({len(devices)})."
        )
    return jax.make_mesh(
        (len(devices) // model_size, model_size), (DATA_AXIS, MODEL_AXIS),
        axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices,
    )


def _path_names(path) -> tuple[str, ...]:
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
    return tuple(names)


def partition_spec(
    axes: tuple[str | None, ...],
    shape: tuple[int, ...],
    *,
    data_size: int,
    model_size: int = 1,
    fsdp: bool = False,
    fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
) -> P:
    """PartitionSpec of one parameter (or optimizer-state leaf shaped like it).

    `axes` are its logical axis names, one per dimension (e.g. ("tokens", "mlp")
    for Mixer's first token-mixing kernel; see `models.param_axes`). With
    `model_size > 1` the first "mlp"/"heads" axis that divides it goes to 'model';
    FSDP splits the largest remaining dimension that divides `data_size`, never
    one named in `_FSDP_NEVER`.
    """
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} axis names {axes} for an array of shape {shape}.")
    spec: list[str | None] = [None] * len(shape)
    if model_size > 1:
        split = next((d for d, name in enumerate(axes)
                      if name in _MODEL_AXES and shape[d] % model_size == 0), None)
        if split is not None:
            spec[split] = MODEL_AXIS
    if fsdp and data_size > 1 and math.prod(shape) >= fsdp_min_size:
        free = [d for d in range(len(shape)) if spec[d] is None and axes[d] not in _FSDP_NEVER
                and shape[d] % data_size == 0]
        if free:
            spec[max(free, key=lambda d: shape[d])] = DATA_AXIS
    return P(*spec)


def leaf_axes(param_axes: Mapping[tuple[str, ...], tuple], names: tuple[str, ...],
              ndim: int) -> tuple[str | None, ...]:
    """The logical axes of a state leaf at path `names`: those of the parameter whose
    path ends its path (optimizer state mirrors the parameters: ('opt_state', '1',
    '0', 'trace', 'stem', 'kernel') is shaped like ('stem', 'kernel')); unnamed
    axes for anything else (scalars, counters, RNG)."""
    for start in range(len(names)):
        axes = param_axes.get(names[start:])
        if axes is not None and len(axes) == ndim:
            return tuple(axes)
    return (None,) * ndim


# --------------------------------------------------------------------------
# Strategies.

class Strategy(abc.ABC):
    """Runs `steps.init_state/train_step/eval_step` on devices; see module docstring."""

    def __init__(self, model, tx, *, image_shape, accum_steps: int = 1,
                 mixer: mix.Mixer | None = None):
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {accum_steps}.")
        self.model, self.tx, self.accum_steps = model, tx, accum_steps
        self.image_shape = tuple(image_shape)
        self._init_fn = functools.partial(
            steps.init_state, model, tx, image_shape=self.image_shape
        )
        # Mixed-sample augmentation, each device on its own examples (None: off).
        self.mixer = None if mixer is None else self._per_device(mixer)
        self._train_fn = functools.partial(
            steps.train_step, model=model, tx=tx, accum_steps=accum_steps, mixer=self.mixer
        )
        self._eval_fn = functools.partial(steps.eval_step, model=model)
        self._abstract = None

    @property
    @abc.abstractmethod
    def data_parallel_size(self) -> int:
        """Number of ways the global batch is split (it must divide the batch)."""

    def _per_device(self, mixer: mix.Mixer) -> mix.Mixer:
        """`mixer` as the training step must call it to mix on each device alone."""
        return mixer

    @abc.abstractmethod
    def init(self, rng: jax.Array) -> steps.TrainState:
        """A fresh state (params from `rng`), created directly in its device layout."""

    @abc.abstractmethod
    def _abstract_sharding(self, path, leaf) -> jax.sharding.Sharding:
        """Sharding of one leaf of the (saveable) state."""

    @abc.abstractmethod
    def _put(self, value: np.ndarray, abstract: jax.ShapeDtypeStruct) -> jax.Array:
        """One host array -> its device layout."""

    @abc.abstractmethod
    def to_saveable(self, state: steps.TrainState) -> steps.TrainState:
        """The state as orbax should save it (matches `abstract_state()`)."""

    @abc.abstractmethod
    def train_step(self, state, batch) -> tuple[steps.TrainState, dict]:
        """One step on a device batch; returns the new state and global-mean metrics.

        The input state's buffers are donated: use only the returned state.
        """

    @abc.abstractmethod
    def eval_step(self, variables, batch) -> dict:
        """Global sums 'loss', 'top1', 'top5', 'count' over a device batch
        (`variables`: `variables_of(state)`)."""

    @abc.abstractmethod
    def put_batch(self, batch: Mapping[str, Any]) -> dict:
        """This host's part of the global batch (dict of arrays) -> device batch."""

    def abstract_state(self) -> steps.TrainState:
        """Shapes, dtypes and shardings of the saveable state (for orbax restore)."""
        if self._abstract is None:
            key = jax.eval_shape(jax.random.PRNGKey, 0)  # raw key of the default PRNG
            shapes = jax.eval_shape(self._init_fn, key)
            self._abstract = jax.tree_util.tree_map_with_path(
                lambda path, leaf: jax.ShapeDtypeStruct(
                    leaf.shape, leaf.dtype, sharding=self._abstract_sharding(path, leaf)
                ),
                shapes,
            )
        return self._abstract

    def place(self, host_state: steps.TrainState) -> steps.TrainState:
        """A host (numpy, or restored) state shaped like `abstract_state()` -> devices."""
        return self._place_tree(host_state, self.abstract_state())

    def from_saveable(self, state: steps.TrainState) -> steps.TrainState:
        """A state restored into `abstract_state()` -> the live layout (inverse of `to_saveable`)."""
        return state

    def with_params(self, state: steps.TrainState, host_params) -> steps.TrainState:
        """`state` with its parameters replaced by host ones (e.g. from an .npz)."""
        return state.replace(params=self._place_tree(host_params, self.abstract_state().params))

    def with_variables(self, state: steps.TrainState, host_variables) -> steps.TrainState:
        """`state` with its parameters and constants replaced by host ones (a variables
        dict, e.g. from `finetune.load_pretrained`)."""
        params, constants = models.split_variables(host_variables)
        return self.with_params(state, params).replace(
            constants=self._place_tree(constants, self.abstract_state().constants))

    def variables_of(self, state: steps.TrainState):
        """The parameters and constants in the layout `eval_step` takes."""
        return state.variables

    def prefetch(self, host_batches: Iterable[Mapping[str, Any]], size: int = 2) -> Iterator[dict]:
        """Device batches from host ones, `size` of them transferred ahead of use."""
        iterator = iter(host_batches)
        queue = collections.deque()

        def enqueue(n):
            for batch in itertools.islice(iterator, n):
                queue.append(self.put_batch(batch))

        enqueue(size)
        while queue:
            yield queue.popleft()
            enqueue(1)

    def _place_tree(self, host_tree, abstract_tree):
        abstract_leaves, treedef = jax.tree.flatten(abstract_tree)
        host_leaves, host_def = jax.tree.flatten(host_tree)
        if host_def != treedef:
            raise ValueError(
                f"State to place does not match the model/optimizer structure:\n"
                f"expected {treedef}\ngot {host_def}"
            )
        placed = []
        for (path, abstract), value in zip(
            jax.tree_util.tree_leaves_with_path(abstract_tree), host_leaves
        ):
            value = np.asarray(value)
            if value.shape != abstract.shape:
                raise ValueError(
                    f"{jax.tree_util.keystr(path)}: shape {value.shape} does not match "
                    f"the model's {abstract.shape}."
                )
            placed.append(self._put(value.astype(abstract.dtype, copy=False), abstract))
        return jax.tree.unflatten(treedef, placed)

    def _check_batch(self, size: int, what: str = "batch") -> None:
        if size % self.data_parallel_size:
            raise ValueError(
                f"A {what} of {size} examples cannot be split evenly over "
                f"{self.data_parallel_size} data-parallel devices."
            )


class MeshStrategy(Strategy):
    """`jax.jit` over a ('data', 'model') mesh: 'data' (replicated) or 'fsdp'."""

    def __init__(self, model, tx, *, image_shape, mesh: Mesh, fsdp: bool = False,
                 fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE, accum_steps: int = 1,
                 mixer: mix.Mixer | None = None):
        self.mesh, self.fsdp, self.fsdp_min_size = mesh, fsdp, fsdp_min_size
        super().__init__(model, tx, image_shape=image_shape, accum_steps=accum_steps,
                         mixer=mixer)
        axes = models.param_axes(model, self.image_shape)
        self._param_axes = {_path_names(path): names for path, names in
                            jax.tree_util.tree_leaves_with_path(
                                axes, is_leaf=lambda x: isinstance(x, tuple))}
        self.replicated = NamedSharding(mesh, P())
        self.batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
        self.state_sharding = jax.tree.map(lambda leaf: leaf.sharding, self.abstract_state())
        variables_sharding = self.state_sharding.variables
        self._init = jax.jit(self._init_fn, out_shardings=self.state_sharding)
        self._train = jax.jit(
            self._train_fn,
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, self.replicated),
            donate_argnums=0,
        )
        self._eval = jax.jit(
            self._eval_fn,
            in_shardings=(variables_sharding, self.batch_sharding),
            out_shardings=self.replicated,
        )

    def __repr__(self):
        shape = dict(zip(self.mesh.axis_names, self.mesh.devices.shape))
        kind = "fsdp" if self.fsdp else "data"
        return f"MeshStrategy({kind}, mesh={shape}, accum_steps={self.accum_steps})"

    @property
    def data_parallel_size(self) -> int:
        return self.mesh.shape[DATA_AXIS]

    def _per_device(self, mixer):
        # shard_map: jit alone may move examples between devices to find partners.
        return mix.per_device(mixer, self.mesh, DATA_AXIS)

    def _abstract_sharding(self, path, leaf):
        # Called for one leaf at a time; compute the rule directly.
        names = _path_names(path)
        if names[0] not in ("params", "opt_state"):
            return NamedSharding(self.mesh, P())
        return NamedSharding(self.mesh, partition_spec(
            leaf_axes(self._param_axes, names[1:], len(leaf.shape)), leaf.shape, data_size=self.mesh.shape[DATA_AXIS],
            model_size=self.mesh.shape[MODEL_AXIS], fsdp=self.fsdp,
            fsdp_min_size=self.fsdp_min_size,
        ))

    def _put(self, value, abstract):
        return jax.make_array_from_callback(value.shape, abstract.sharding, lambda i: value[i])

    def init(self, rng):
        rng = np.asarray(steps.raw_key(rng))
        return self._init(self._put(rng, jax.ShapeDtypeStruct(rng.shape, rng.dtype,
                                                              sharding=self.replicated)))

    def to_saveable(self, state):
        return state

    def train_step(self, state, batch):
        return self._train(state, batch)

    def eval_step(self, variables, batch):
        return self._eval(variables, batch)

    def lower_train_step(self, batch_shapes: Mapping[str, Any]) -> jax.stages.Lowered:
        """The training step lowered for a global batch of these shapes (anything with
        `.shape` and `.dtype`) against `abstract_state()`. Nothing is allocated, so the
        memory of models too big for the devices at hand can be planned with
        `.compile().memory_analysis()`."""
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
                 for k, v in batch_shapes.items()}
        return self._train.lower(self.abstract_state(), batch)

    def put_batch(self, batch):
        def put(x):
            x = np.asarray(x)
            self._check_batch(x.shape[0] * jax.process_count(), "global batch")
            return jax.make_array_from_process_local_data(self.batch_sharding, x)

        return {k: put(v) for k, v in batch.items()}


class PmapStrategy(Strategy):
    """`jax.pmap` over the local devices (all devices of all hosts take part)."""

    def __init__(self, model, tx, *, image_shape, accum_steps: int = 1,
                 mixer: mix.Mixer | None = None):
        # Under pmap each device sees its own examples and a key folded with its index.
        super().__init__(model, tx, image_shape=image_shape, accum_steps=accum_steps,
                         mixer=mixer)
        self.devices = jax.local_devices()
        local_mesh = Mesh(np.array(self.devices), (PMAP_AXIS,))
        # pmap's own layout: leading axis over the local devices.
        self._stacked = NamedSharding(local_mesh, P(PMAP_AXIS))
        # What gets saved: one logical copy, replicated on every device of every host.
        self._replicated = NamedSharding(Mesh(np.array(jax.devices()), (PMAP_AXIS,)), P())
        # One program drops the device axis of a whole state (a copy per device stays).
        self._unstack = jax.jit(lambda tree: jax.tree.map(lambda x: x[0], tree),
                                out_shardings=NamedSharding(local_mesh, P()))
        self._init = jax.pmap(self._init_fn)
        self._train = jax.pmap(
            functools.partial(self._train_fn, axis_name=PMAP_AXIS),
            axis_name=PMAP_AXIS, donate_argnums=0,
        )
        self._eval = jax.pmap(
            functools.partial(self._eval_fn, axis_name=PMAP_AXIS), axis_name=PMAP_AXIS
        )

    def __repr__(self):
        return (f"PmapStrategy(devices={jax.device_count()}, "
                f"local={len(self.devices)}, accum_steps={self.accum_steps})")

    @property
    def data_parallel_size(self) -> int:
        return jax.device_count()

    def _abstract_sharding(self, path, leaf):
        return self._replicated

    def _put(self, value, abstract):
        stacked = np.broadcast_to(value, (len(self.devices), *value.shape))
        return jax.device_put(stacked, self._stacked)

    def init(self, rng):
        rng = np.asarray(steps.raw_key(rng))
        return self._init(np.broadcast_to(rng, (len(self.devices), *rng.shape)))

    def to_saveable(self, state):
        def as_global(x):  # this host's copies -> one array replicated over all hosts
            copies = [shard.data for shard in x.addressable_shards]
            return jax.make_array_from_single_device_arrays(x.shape, self._replicated, copies)

        return jax.tree.map(as_global, self._unstack(state))

    def from_saveable(self, state):
        return self.place(state)  # one copy per device again

    def train_step(self, state, batch):
        state, metrics = self._train(state, batch)
        return state, jax.tree.map(lambda m: m[0], metrics)

    def eval_step(self, variables, batch):
        return jax.tree.map(lambda s: s[0], self._eval(variables, batch))

    def put_batch(self, batch):
        n = len(self.devices)

        def put(x):
            x = np.asarray(x)
            if x.shape[0] % n:
                raise ValueError(
                    f"A host batch of {x.shape[0]} examples cannot be split evenly over "
                    f"this host's {n} devices."
                )
            return jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), self._stacked)

        return {k: put(v) for k, v in batch.items()}


def make_strategy(config, model, tx) -> Strategy:
    """The strategy named by `config.parallelism` ('pmap' | 'data' | 'fsdp', default
    'data'), with `config.mesh_model` (default 1), `config.accum_steps` (default 1),
    `config.fsdp_min_size`, image shape `(config.pp.crop,) * 2 + (3,)` and the
    mixed-sample augmentation of `config.mix` (off when absent).

    Checks that `config.batch` (and `config.batch_eval`, if set) split evenly.
    """
    kind = config.get("parallelism", "data")
    if kind not in PARALLELISMS:
        raise ValueError(f"Unknown config.parallelism {kind!r}; expected one of {PARALLELISMS}.")
    model_size = config.get("mesh_model", 1) or 1
    accum_steps = config.get("accum_steps", 1) or 1
    image_shape = (config.pp.crop, config.pp.crop, 3)
    mixer = mix.from_model(config.get("mix"), model)
    if kind == "pmap":
        if model_size != 1:
            raise ValueError("mesh_model > 1 needs a mesh strategy ('data' or 'fsdp'), not 'pmap'.")
        strategy = PmapStrategy(model, tx, image_shape=image_shape, accum_steps=accum_steps,
                                mixer=mixer)
    else:
        strategy = MeshStrategy(
            model, tx, image_shape=image_shape, mesh=make_mesh(model_size),
            fsdp=kind == "fsdp", accum_steps=accum_steps, mixer=mixer,
            fsdp_min_size=config.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE),
        )
    batch = config.get("batch", None)
    if batch is not None:
        if batch % (strategy.data_parallel_size * accum_steps):
            raise ValueError(
                f"config.batch={batch} must be divisible by the {strategy.data_parallel_size} "
                f"data-parallel devices times accum_steps={accum_steps}."
            )
    batch_eval = config.get("batch_eval", None)
    if batch_eval is not None:
        strategy._check_batch(batch_eval, "config.batch_eval")
    return strategy
