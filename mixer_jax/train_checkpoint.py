"""Orbax checkpoints of training runs: save, resume, and read parameters back.

Layout, in `<workdir>/checkpoints/<step>/` (one directory per saved step):
  params/  the model parameters (the model's own layout, per-block or scanned);
  constants/  only for models with non-trainable variable collections: `{collection:
           tree}` (RandFormer: `{"frozen": ...}`, its random mixing matrices as drawn at
           init), restored with the parameters wherever they are read;
  train/   {'step', 'opt_state', 'rng'}: the rest of the TrainState;
  meta/    JSON: {'step', 'config', 'class_names'} (the config the run used, and the
           names of its classes when the dataset has them: `predict` shows them), 'model_name'
           and 'preprocessing' (what the weights expect: `models.Preprocessing` fields).
The data position is the step: `input_pipeline.train_dataset(config, start_step=step)`
yields exactly the batches an uninterrupted run sees from there on.

  integrity.json  size and SHA-256 of every file above, written before the step
           directory appears (so a complete step always carries it).
Saves are asynchronous (training continues while arrays are written) and
atomic (a step directory appears only once complete, so a crash mid-save leaves
the previous checkpoint as the latest). `convert.py` writes checkpoints with a
`params/` (and `constants/`) item only; `restore_params` / `restore_variables` read
the parameters (and constants) of either kind.

Reading verifies first: a resumed run checks the newest step against its
integrity data; a step that fails (a missing, truncated or altered file) is
reported, moved to `<workdir>/corrupt_checkpoints/`, and the next older step is
tried. `restore_params` (predict, convert, fine-tuning) verifies likewise and
refuses NaN/Inf parameters.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from mixer_jax import models
from mixer_jax.checkpoint import CheckpointError
from mixer_jax.errors import UserError

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"  # in the workdir: steps that failed verification
INTEGRITY_FILE = "integrity.json"
CONSTANTS = "constants"  # the item of a model's constants (`steps.TrainState.constants`)
_ITEMS = ("params", CONSTANTS, "train", "meta")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_CHUNK = 1 << 22
# What a full file system (or a file-size limit) says, whichever layer reports it.
_NO_SPACE = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
             errno.EFBIG: "File too large"}


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, truncated or altered, or unreadable."""


class DiskFullError(UserError, OSError):
    """A checkpoint could not be written for lack of space; earlier ones are intact."""


class TrainCheckpointer:
    """Saves and restores a run's TrainState under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = epath.Path(workdir) / CHECKPOINT_DIR
        self._async = async_save
        self._saving = None  # (step, bytes) of the save in flight, for error messages
        self._failed = False
        self.class_names: list[str] | None = None  # stored with every step (set by train)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                # Runs in the save thread, before the step directory gets its final name.
                async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_pending)
                if async_save else None),
            item_names=_ITEMS,
        )

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, config=None) -> None:
        """Starts saving `state` (a saveable TrainState) as `step`; returns before it is written.

        Raises DiskFullError (here or from a later `wait`/`save`/`close`) when the file
        system is full; the steps saved before stay complete and restorable.
        """
        meta = {"step": int(step), "config": jsonable_config(config)}
        if self.class_names is not None:
            meta["class_names"] = list(self.class_names)
        if config is not None and config.get("model_name") and config.get("pp"):
            # what `predict` and later fine-tuning need to use the weights
            meta.update(run_meta(config))
        with self._space_errors():
            self._manager.wait_until_finished()  # the previous save: its errors first
            self._saving = (int(step), _nbytes(state))
            self._check_free_space()
            self._manager.save(int(step), force=True, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                **_constants_item(state.constants, ocp.args.StandardSave),
                train=ocp.args.StandardSave(_train_part(state)),
                meta=ocp.args.JsonSave(meta),
            ))
            if not self._async:
                _seal(self.directory / str(step))

    def _seal_pending(self) -> None:
        """Writes the integrity data of the save in flight into its temporary directory."""
        step = self._saving[0]
        pending = sorted(self.directory.glob(f"{step}{_TMP_SUFFIX}*"))
        # Object stores (gs://) have no temporary directory: orbax writes in place.
        _seal(pending[-1] if pending else self.directory / str(step))

    def _check_free_space(self) -> None:
        """Refuses to start a save that cannot fit (local file systems: object stores have room)."""
        if "://" in str(self.directory):
            return
        free = shutil.disk_usage(self.directory).free
        if free < self._saving[1]:
            raise OSError(errno.ENOSPC, f"{_NO_SPACE[errno.ENOSPC]}: {free / 2**20:.1f} MiB free")

    @contextlib.contextmanager
    def _space_errors(self):
        """Turns an out-of-space failure of the save in flight into one DiskFullError."""
        try:
            yield
        except Exception as error:
            cause = _out_of_space(error)
            if cause is None or self._saving is None:
                raise
            self._failed = True
            step, nbytes = self._saving
            kept = self.all_steps()
            raise DiskFullError(
                f"Cannot write the checkpoint of step {step} to {self.directory} ({cause}): "
                f"it needs about {nbytes / 2**20:.1f} MiB. The earlier checkpoints "
                f"({', '.join(map(str, kept)) or 'none'}) are intact; free some space (or "
                "move the workdir) and rerun to resume.") from None

    def discard_corrupt_steps(self) -> int | None:
        """Verifies the newest steps; moves bad ones aside. Returns the newest good step.

        A step that fails verification is logged (step, file, why), moved to
        `<workdir>/corrupt_checkpoints/`, and the next older one is tried. Raises
        CorruptCheckpointError when steps exist but none is good. On several hosts,
        process 0 checks and moves; every process then sees the same steps.
        """
        bad = []
        if jax.process_index() == 0:
            for step in sorted(self.all_steps(), reverse=True):
                problem = verify_step(self.directory / str(step))
                if problem is None:
                    break
                moved = _move_aside(self.directory / str(step))
                logging.warning("Checkpoint step %d is corrupt: %s. Moved it to %s; resuming "
                                "from the step before.", step, problem, moved)
                bad.append(f"step {step} ({problem}; moved to {moved})")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("mixer_jax.discard_corrupt_steps")
        if bad or jax.process_count() > 1:
            self._manager.reload()
        latest = self.latest_step()
        if latest is None and bad:
            raise CorruptCheckpointError(
                f"No good checkpoint left in {self.directory}: {'; '.join(bad)}. Restore the "
                "files from a copy, or start afresh in a new workdir.")
        return latest

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
                **_constants_item(abstract_state.constants, ocp.args.StandardRestore),
                train=ocp.args.StandardRestore(_train_part(abstract_state)),
                meta=ocp.args.JsonRestore(),
            ))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
            raise CheckpointError(
                f"The checkpoint of step {step} in {self.directory} does not fit this run's "
                f"model and optimizer state; it was written with another config (model, "
                f"optimizer or model.scan). Resume with that config, or use a new workdir. "
                f"({error})") from error
        constants = restored[CONSTANTS] if abstract_state.constants else {}
        return (abstract_state.replace(params=restored.params, constants=constants,
                                       **restored.train), restored.meta)

    def reached_preemption(self, step: int) -> bool:
        """True once every host has reached the step at which a preemption notice applies."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        with self._space_errors():
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._failed:  # the error was raised already: do not raise it again
            with contextlib.suppress(Exception):
                self._manager.close()
            return
        with self._space_errors():
            self._manager.close()  # waits for pending saves first

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _constants_item(constants, make) -> dict:
    """The composite entry of a model's constants; none when it has none (most families)."""
    return {CONSTANTS: make(constants)} if constants else {}


def _train_part(state) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def _nbytes(tree) -> int:
    return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
               for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _out_of_space(error: BaseException) -> str | None:
    """What the file system said if `error` (or its cause) is an out-of-space error."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return error.strerror or _NO_SPACE[error.errno]
        for message in _NO_SPACE.values():  # tensorstore reports errno in its text only
            if message in str(error):
                return message
        error = error.__cause__ or error.__context__
    return None


# ---------------------------------------------------------------------------- integrity


def _item_files(step_dir: epath.Path) -> list[epath.Path]:
    """The files of a step's items (the top-level files are orbax's own, rewritten later)."""
    return sorted(p for item in step_dir.iterdir() if item.is_dir() for p in _files_under(item))


def _files_under(directory: epath.Path):
    for path in directory.iterdir():  # epath has no recursive glob on object stores
        if path.is_dir():
            yield from _files_under(path)
        else:
            yield path


def _file_digest(path: epath.Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _seal(step_dir: epath.Path) -> None:
    """Writes `integrity.json` (size and SHA-256 per file) into a step directory."""
    if jax.process_index() != 0:
        return
    files = {str(p.relative_to(step_dir)): _file_digest(p) for p in _item_files(step_dir)}
    temporary = step_dir / f"{INTEGRITY_FILE}.tmp"
    temporary.write_text(json.dumps({"files": files}, indent=0))
    temporary.rename(step_dir / INTEGRITY_FILE)


def verify_step(step_dir: epath.Path) -> str | None:
    """None if a step directory is intact, else what is wrong with it (naming the file).

    Steps written before integrity data existed get a structural check only.
    """
    record = step_dir / INTEGRITY_FILE
    if not record.exists():
        return _structure_problem(step_dir)
    try:
        files = json.loads(record.read_text())["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        return f"{record} is unreadable ({error})"
    for name, (size, digest) in sorted(files.items()):
        path = step_dir / name
        if not path.exists():
            return f"{path} is missing"
        actual_size, actual = _file_digest(path)
        if actual_size != size:
            return f"{path} has {actual_size} bytes, {size} were written (truncated or replaced)"
        if actual != digest:
            return f"{path} does not match the SHA-256 recorded when it was written (altered)"
    return None


def _structure_problem(step_dir: epath.Path) -> str | None:
    items = [p for p in step_dir.iterdir() if p.is_dir()]
    names = {p.name for p in items}
    if "params" not in names:
        return f"{step_dir / 'params'} is missing"
    if "meta" in names and not {"train", "meta"} <= names:
        return f"{step_dir / 'train'} is missing"
    for item in items:
        if not any(True for _ in _files_under(item)):
            return f"{item} holds no files"
    if "meta" in names:
        try:
            json.loads((step_dir / "meta" / "metadata").read_text())
        except (OSError, ValueError, UnicodeDecodeError) as error:
            return f"{step_dir / 'meta' / 'metadata'} is unreadable ({error})"
    logging.warning("Checkpoint %s has no %s (written by an older version): only its "
                    "structure was checked.", step_dir, INTEGRITY_FILE)
    return None


def _move_aside(step_dir: epath.Path) -> epath.Path:
    """Moves a bad step out of the checkpoints (never deletes it); returns where to."""
    root = step_dir.parent.parent / CORRUPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    target = root / step_dir.name
    if target.exists():
        target = root / f"{step_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    step_dir.rename(target)
    return target


def jsonable_config(config):
    if config is None:
        return None
    return json.loads(config.to_json_best_effort())


def run_meta(config) -> dict:
    """{'model_name', 'preprocessing'} of a run's config, for its checkpoints' meta."""
    import dataclasses  # noqa: PLC0415

    from mixer_jax import train_config  # noqa: PLC0415  (the config module imports jax)

    return {"model_name": config.get("model_name"),
            "preprocessing": dataclasses.asdict(train_config.preprocessing(config))}


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


def stored_shapes(path: str, step: int | None = None) -> dict:
    """{collection: {'a/b/c': shape}} of the variables stored in a checkpoint: 'params' and
    each collection of constants (nothing is read)."""
    root, step = find_checkpoint(path, step)
    shapes = {"params": _item_shapes(root / str(step) / "params")}
    if (root / str(step) / CONSTANTS).is_dir():
        for key, shape in _item_shapes(root / str(step) / CONSTANTS).items():
            collection, rest = key.split("/", 1)
            shapes.setdefault(collection, {})[rest] = shape
    return shapes


def _item_shapes(params_dir: epath.Path) -> dict:
    tree = ocp.PyTreeCheckpointHandler().metadata(params_dir).tree
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def restore_params(path: str, target=None, *, step: int | None = None):
    """The parameters of `restore_variables` (`target`: a parameter tree, or None)."""
    return restore_variables(path, None if target is None else {"params": target},
                             step=step)["params"]


def restore_variables(path: str, target=None, *, step: int | None = None) -> dict:
    """Reads checkpointed variables (from a training run or from `convert`): `{"params":
    ..., **constants}`, the constants (e.g. RandFormer's "frozen") where the checkpoint has them.

    `target`: None reads everything as host numpy arrays; otherwise a variables dict of
    (possibly partial) pytrees of jax.ShapeDtypeStruct whose leaves are read directly into
    their `.sharding`, so large models never pass through one host's memory whole.

    Verifies the step's integrity data first and refuses NaN/Inf values: both raise
    CorruptCheckpointError naming the step and the file or parameter.
    """
    root, step = find_checkpoint(path, step)
    name = f"The checkpoint of step {step} in {root}"
    problem = verify_step(root / str(step))
    if problem is not None:
        raise CorruptCheckpointError(f"{name} is corrupt: {problem}. Use another step "
                                     "(--step) or a good copy.")
    params_target, constants_target = models.split_variables(target or {"params": None})
    constants_dir = root / str(step) / CONSTANTS
    if constants_target and not constants_dir.is_dir():
        raise CheckpointError(f"{name} holds no constants ({', '.join(constants_target)}); "
                              "it was written for a model without them.")
    constants = {}
    if constants_dir.is_dir() and (target is None or constants_target):
        constants = _restore_item(constants_dir, constants_target or None)
    params = _restore_item(root / str(step) / "params", params_target)
    for tree in (params, constants):
        _check_finite(tree, name)
    return models.as_variables(params, constants)


def _restore_item(directory: epath.Path, target):
    checkpointer = ocp.PyTreeCheckpointer()
    if target is None:
        restore_args = traverse_util.unflatten_dict(
            {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in _item_shapes(directory)},
            sep="/")
        return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            restore_args=restore_args))
    return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))


def _check_finite(params, source: str) -> None:
    for key, value in traverse_util.flatten_dict(dict(params), sep="/").items():
        finite = (np.isfinite if isinstance(value, np.ndarray) else jax.numpy.isfinite)(value)
        if not bool(finite.all()):
            raise CorruptCheckpointError(
                f"{source}: parameter {key!r} holds NaN/Inf values (the run that wrote it had "
                "diverged, or the file was altered); refusing to use it.")


def save_params(params, directory: str, *, step: int = 0, meta: dict | None = None,
                constants=None) -> None:
    """Writes `params` (and the model's `constants`, if any) as a params-only checkpoint
    `<directory>/<step>/` (synchronously)."""
    items = {"params": ocp.args.StandardSave(params),
             **_constants_item(constants, ocp.args.StandardSave)}
    if meta is not None:
        items["meta"] = ocp.args.JsonSave(meta)
    with ocp.CheckpointManager(epath.Path(directory), item_names=tuple(items),
                               options=ocp.CheckpointManagerOptions(
                                   enable_async_checkpointing=False, create=True)) as manager:
        manager.save(step, args=ocp.args.Composite(**items), force=True)
    _seal(epath.Path(directory) / str(step))
