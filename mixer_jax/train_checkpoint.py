"""Orbax checkpoints of training runs: save, resume, and read parameters back.

Layout, in `<workdir>/checkpoints/<step>/` (one directory per saved step):
  params/  the model parameters (the model's own layout, per-block or scanned);
  train/   {'step', 'opt_state', 'rng'}: the rest of the TrainState;
  meta/    JSON: {'step', 'config', 'class_names'} (the config the run used, and the
           names of its classes when the dataset has them: `predict` shows them).
The data position is the step: `input_pipeline.train_dataset(config, start_step=step)`
yields exactly the batches an uninterrupted run sees from there on.

Saves are asynchronous (training continues while arrays are written) and
atomic (a step directory appears only once complete, so a crash mid-save leaves
the previous checkpoint as the latest). `convert.py` writes checkpoints with a
`params/` item only; `restore_params` reads the parameters of either kind.
"""
from __future__ import annotations

import json

import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

CHECKPOINT_DIR = "checkpoints"
_ITEMS = ("params", "train", "meta")


class TrainCheckpointer:
    """Saves and restores a run's TrainState under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = epath.Path(workdir) / CHECKPOINT_DIR
        self.class_names: list[str] | None = None  # stored with every step (set by train)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True),
            item_names=_ITEMS,
        )

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, config=None) -> None:
        """Starts saving `state` (a saveable TrainState) as `step`; returns before it is written."""
        meta = {"step": int(step), "config": jsonable_config(config)}
        if self.class_names is not None:
            meta["class_names"] = list(self.class_names)
        self._manager.save(int(step), force=True, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave(_train_part(state)),
            meta=ocp.args.JsonSave(meta),
        ))

    def restore(self, abstract_state, step: int | None = None):
        """Restores step (default: latest) into the shardings of `abstract_state`.

        `abstract_state` is a TrainState of jax.ShapeDtypeStruct (with `.sharding`), e.g.
        `strategy.abstract_state()`. Returns `(state, meta)`.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state.params),
                train=ocp.args.StandardRestore(_train_part(abstract_state)),
                meta=ocp.args.JsonRestore(),
            ))
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"The checkpoint of step {step} in {self.directory} does not fit this run's "
                f"model and optimizer state; it was written with another config (model, "
                f"optimizer or model.scan). Resume with that config, or use a new workdir. "
                f"({error})") from error
        return abstract_state.replace(params=restored.params, **restored.train), restored.meta

    def reached_preemption(self, step: int) -> bool:
        """True once every host has reached the step at which a preemption notice applies."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()  # waits for pending saves first

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _train_part(state) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def jsonable_config(config):
    if config is None:
        return None
    return json.loads(config.to_json_best_effort())


def find_checkpoint(path: str, step: int | None = None) -> tuple[epath.Path, int]:
    """Resolves a workdir, a checkpoints directory or a step directory to (root, step).

    Without `step`, a workdir or checkpoints directory means its latest checkpoint.
    """
    path = epath.Path(path)
    if (path / "params").is_dir() and path.name.isdigit():
        if step is not None and step != int(path.name):
            raise ValueError(f"{path} is the checkpoint of step {path.name}, not {step}.")
        return path.parent, int(path.name)
    root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    steps = ocp.utils.checkpoint_steps(root) if root.is_dir() else []  # complete ones only
    if not steps:
        raise FileNotFoundError(
            f"No orbax checkpoint found in {path} (looked for <step>/params there and in "
            f"{path}/{CHECKPOINT_DIR}).")
    if step is None:
        return root, max(steps)
    if step not in steps:
        raise FileNotFoundError(f"No checkpoint of step {step} in {root}; it has {sorted(steps)}.")
    return root, step


def read_meta(path: str, step: int | None = None) -> dict:
    """The `meta` JSON of a checkpoint (workdir, checkpoints or step directory; latest step
    unless `step`), or {} for one written without it (e.g. by `convert npz-to-orbax`)."""
    root, step = find_checkpoint(path, step)
    file = root / str(step) / "meta" / "metadata"
    return json.loads(file.read_text()) if file.exists() else {}


def stored_params_shapes(path: str, step: int | None = None) -> dict:
    """Flat {'a/b/c': shape} of the parameters stored in a checkpoint (nothing is read)."""
    root, step = find_checkpoint(path, step)
    return _item_shapes(root / str(step) / "params")


def _item_shapes(params_dir: epath.Path) -> dict:
    tree = ocp.PyTreeCheckpointHandler().metadata(params_dir).tree
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def restore_params(path: str, target=None, *, step: int | None = None):
    """Reads checkpointed parameters (from a training run or from `convert npz-to-orbax`).

    `target`: None reads all parameters as host numpy arrays; otherwise a (possibly partial)
    pytree of jax.ShapeDtypeStruct whose leaves are read directly into their `.sharding`, so
    large models never pass through one host's memory whole.
    """
    root, step = find_checkpoint(path, step)
    checkpointer = ocp.PyTreeCheckpointer()
    params_dir = root / str(step) / "params"
    if target is None:
        shapes = _item_shapes(params_dir)
        restore_args = traverse_util.unflatten_dict(
            {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in shapes}, sep="/")
        return checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
            restore_args=restore_args))
    return checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))


def save_params(params, directory: str, *, step: int = 0, meta: dict | None = None) -> None:
    """Writes `params` as a params-only checkpoint `<directory>/<step>/` (synchronously)."""
    items = {"params": ocp.args.StandardSave(params)}
    if meta is not None:
        items["meta"] = ocp.args.JsonSave(meta)
    with ocp.CheckpointManager(epath.Path(directory), item_names=tuple(items),
                               options=ocp.CheckpointManagerOptions(
                                   enable_async_checkpointing=False, create=True)) as manager:
        manager.save(step, args=ocp.args.Composite(**items), force=True)
