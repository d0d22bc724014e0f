"""The training job: train (from scratch or from a checkpoint), evaluate, checkpoint.

`train_and_evaluate(config, workdir)` runs one job. Every device-related thing
goes through a `parallel.Strategy` (pmap, or jit over a data/FSDP/model mesh),
the step itself is `steps.train_step`, and side effects stay at the edges:
checkpoints (`train_checkpoint`), metrics and progress lines (`metric_writers`).

A job started again with the same workdir resumes from its latest checkpoint
(step, parameters, optimizer state, RNG and data position), so a run that was
killed or preempted ends exactly as if it had run through.

SIGTERM, SIGINT and a preemption notice stop a run the same way: the step in
progress finishes, a checkpoint of it is written synchronously, metrics are
flushed, and `TrainingInterrupted` (a SystemExit with status
`INTERRUPTED_EXIT_STATUS`, 75: "interrupted, resumable") ends the program after
one log line. A second signal ends the process at once (its default action).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import threading
import time

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from mixer_jax import (checkpoint, finetune, input_pipeline, metric_writers, models, optim,
                       parallel, steps, train_checkpoint, train_config, workdir_lock)

INTERRUPTED_EXIT_STATUS = 75  # sysexits' EX_TEMPFAIL: stopped early, rerun to resume
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the step."""


class TrainingInterrupted(SystemExit):
    """A signal or preemption notice stopped training after a checkpoint of `step`.

    A SystemExit, so that the program ends with `INTERRUPTED_EXIT_STATUS` and no
    traceback; rerunning the same command resumes from `step`.
    """

    def __init__(self, step: int, reason: str):
        super().__init__(INTERRUPTED_EXIT_STATUS)
        self.step, self.reason = step, reason


def create_model(config, num_classes: int, **overrides) -> nn.Module:
    """`config.model_name` (any registered name) with the `config.model` overrides (and
    `overrides`)."""
    kwargs = {**train_config.model_kwargs(config), **overrides}
    return models.create_model(config.model_name, num_classes=num_classes, **kwargs)


def pretrained_path(config) -> str | None:
    """The source to fine-tune from, or None (train from scratch).

    `config.pretrained`: anything `finetune.read_source` takes (an `.npz`, an orbax
    checkpoint directory, or a format a registered reader adds). Else
    `pretrained_dir/model_or_filename`: a directory is an orbax checkpoint (a workdir
    or checkpoint directory of an earlier run, or the output of `convert npz-to-orbax`);
    anything else is an `.npz` (the extension may be left out, as in vit_jax).
    """
    if config.get("pretrained"):
        return config.pretrained
    name = config.get("model_or_filename")
    if not name:
        return None
    path = epath.Path(config.pretrained_dir) / name
    if path.is_dir() or path.suffix == ".npz" or not (path.parent / (path.name + ".npz")).exists():
        return str(path)
    return str(path) + ".npz"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A pre-trained source, resolved once per run.

    `shapes` describes it (shapes only: what it is, which widths the model needs);
    `values` holds its arrays on the host, or is None for an orbax checkpoint, whose
    arrays are read later, straight into their shardings when they fit as stored.
    """

    path: str
    shapes: finetune.Source
    values: finetune.Source | None
    # orbax: {collection: flat shapes} as stored (params per-block or scanned; constants)
    stored_shapes: dict | None

    @functools.cached_property
    def identified(self) -> tuple[models.Family, dict]:
        """(family, architecture fields) of the source."""
        return finetune.identify(self.shapes.flat, self.shapes.name, self.shapes.model_name)

    @property
    def family(self) -> models.Family:
        return self.identified[0]


def _shapes_source(stored: dict, name: str, **kw) -> finetune.Source:
    """A Source of zero-stride arrays of these shapes ({collection: flat shapes}, either
    layout)."""
    fake = {collection: traverse_util.unflatten_dict(
        {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}, sep="/")
        for collection, shapes in stored.items()}
    return finetune.Source.of_variables(fake, name, **kw)


def resolve_pretrained(path: str) -> Pretrained:
    """Reads what `path` is (for an orbax checkpoint: its metadata only) once per run."""
    if finetune.is_orbax(path):
        stored = train_checkpoint.stored_shapes(path)
        meta = train_checkpoint.read_meta(path) or {}
        shapes = _shapes_source(stored, repr(path),
                                preprocessing=finetune.preprocessing_from_meta(meta),
                                model_name=meta.get("model_name"))
        return Pretrained(path, shapes, None, stored)
    values = finetune.read_source(path)
    return Pretrained(path, values, values, None)


def _host_variables(strategy, state):
    """The state's parameters and constants as numpy arrays on every host (for
    `load_pretrained`)."""
    variables = strategy.to_saveable(state).variables
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(variables, tiled=True)
    return jax.device_get(variables)


def _restore_sharded_params(pretrained: Pretrained, strategy, state, config):
    """Orbax parameters (and constants) that fit the model (classifier aside) read straight
    into their shardings.

    Returns None when they do not fit as they are (another layout, image size or variant):
    the caller then goes through `finetune.load_pretrained` on the host.
    """
    targets = {c: traverse_util.flatten_dict(tree, sep="/")
               for c, tree in strategy.abstract_state().variables.items()}
    wanted = {c: {k: tuple(v.shape) for k, v in flat.items()} for c, flat in targets.items()}
    stored = pretrained.stored_shapes
    head = lambda k: any(k == p or k.startswith(p + "/") for p in pretrained.family.classifier)
    differ = {k for k in wanted["params"] if stored["params"].get(k) != wanted["params"][k]}
    same_keys = {c: set(v) for c, v in stored.items()} == {c: set(v) for c, v in wanted.items()}
    constants_fit = all(stored[c] == wanted[c] for c in wanted if c != "params")
    if not (same_keys and constants_fit) or not all(head(k) for k in differ):
        return None
    reset_head = config.reset_head if config.reset_head is not None else bool(differ)
    if differ and not reset_head:
        return None  # let load_pretrained explain the mismatch
    if reset_head:
        targets["params"] = {k: v for k, v in targets["params"].items() if not head(k)}
    loaded = train_checkpoint.restore_variables(pretrained.path, {
        c: traverse_util.unflatten_dict(flat, sep="/") for c, flat in targets.items()})
    params, constants = models.split_variables(loaded)
    read = traverse_util.flatten_dict(params, sep="/")
    current = traverse_util.flatten_dict(state.params, sep="/")
    params = traverse_util.unflatten_dict({k: read.get(k, current[k]) for k in current}, sep="/")
    logging.info("Restored %d parameter arrays from %s into their shardings%s.", len(read),
                 pretrained.path, " (head from the new model)" if reset_head else "")
    return state.replace(params=params, constants=constants)


def _load_pretrained(pretrained: Pretrained, strategy, state, config):
    """`state` with its parameters (and constants) taken from the pre-trained source."""
    if pretrained.values is None and not isinstance(strategy, parallel.PmapStrategy):
        restored = _restore_sharded_params(pretrained, strategy, state, config)
        if restored is not None:
            return restored
    source = pretrained.values or finetune.read_source(pretrained.path)
    variables = finetune.load_pretrained(
        source, _host_variables(strategy, state), reset_head=config.reset_head,
        token_mixing=config.token_mixing, image_size=config.pp.crop)
    logging.info("Fine-tuning from %s.", pretrained.path)
    return strategy.with_variables(state, variables)


def _model_overrides(config, ckpt, pretrained: Pretrained | None) -> dict:
    """Architecture overrides the checkpoints impose on `config.model_name`.

    A resumed run keeps the token-mixing widths of its own checkpoint; a fine-tuning run
    takes them from the pretrained parameters (the block-diagonal method widens them).
    """
    latest = ckpt.latest_step()
    if latest is not None:
        own = _shapes_source(train_checkpoint.stored_shapes(str(ckpt.directory), latest),
                             "The run's checkpoint")
        return finetune.token_width_overrides(own, config.pp.crop)
    if pretrained is None:
        return {}
    family = models.get_family(config.model_name)
    if pretrained.family is not family:
        raise checkpoint.CheckpointError(
            f"{pretrained.path!r} holds a {pretrained.family.name} model "
            f"({finetune.describe(*pretrained.identified)}) but "
            f"config.model_name={config.model_name!r} is a {family.name} model; set "
            "config.model_name to the checkpoint's model.")
    return finetune.token_width_overrides(pretrained.shapes, config.pp.crop,
                                          token_mixing=config.token_mixing)


def _with_preprocessing(config, ckpt, pretrained: Pretrained | None):
    """`config` with pp.mean/pp.std filled in: as set, else the run's own checkpoint's
    (resumed), else the pretrained source's, else the model family's."""
    stored = None
    latest = ckpt.latest_step()
    if latest is not None:
        stored = finetune.preprocessing_from_meta(
            train_checkpoint.read_meta(str(ckpt.directory), latest))
    elif pretrained is not None:
        stored = pretrained.shapes.preprocessing
    chosen = stored or models.get_family(config.model_name).preprocessing
    config = ml_collections.ConfigDict(config.to_dict())
    for key in ("mean", "std"):
        if not config.pp.get(key):
            config.pp[key] = tuple(getattr(chosen, key))
    return config


# ------------------------------------------------------------------------------ loop


def evaluate(strategy, state, config) -> dict:
    """Loss, top-1 and top-5 over every eval example exactly once (padding masked out)."""
    totals = {}
    variables = strategy.variables_of(state)
    for batch in strategy.prefetch(input_pipeline.eval_dataset(config).as_numpy_iterator()):
        sums = jax.device_get(strategy.eval_step(variables, batch))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = totals.get("count", 0.0)
    if not count:
        raise ValueError(f"The eval split {config.pp.test!r} of {config.dataset!r} is empty.")
    return {"eval_loss": totals["loss"] / count, "eval_top1": totals["top1"] / count,
            "eval_top5": totals["top5"] / count, "eval_count": count}


def _check_finite(step_metrics, first_step, ckpt) -> None:
    """Raises NonFiniteLossError naming the first step whose loss is NaN/Inf."""
    for offset, metrics in enumerate(step_metrics):
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
            step = first_step + offset
            ckpt.wait()
            last = ckpt.latest_step()
            kept = (f"the last good checkpoint (step {last}) is kept in {ckpt.directory}"
                    if last is not None else "no checkpoint had been written yet")
            raise NonFiniteLossError(
                f"Training loss became {loss} at step {step}; training stopped and {kept}. "
                "Try a lower base_lr, a longer warmup or gradient clipping (grad_norm_clip).")


def _mean_metrics(step_metrics) -> dict:
    return {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}


@dataclasses.dataclass
class Run:
    """What a job trains with, set up by `prepare` (resumed, fine-tuned or fresh)."""

    config: ml_collections.ConfigDict  # complete (defaults filled in) and validated
    model: nn.Module
    strategy: parallel.Strategy
    schedule: optax.Schedule
    state: steps.TrainState
    start_step: int  # 0, or the step of the checkpoint resumed from


def prepare(config: ml_collections.ConfigDict, ckpt: train_checkpoint.TrainCheckpointer) -> Run:
    """Builds model, optimizer and strategy, and the state to start from.

    The state is the latest checkpoint in `ckpt` if any (restored straight into the
    strategy's shardings), else fresh parameters, with the pretrained ones of
    `config.pretrained_dir/model_or_filename` loaded in if set.
    """
    config = train_config.with_defaults(config)
    train_config.validate(config, num_devices=jax.device_count(),
                          process_count=jax.process_count())
    ckpt.discard_corrupt_steps()  # a bad newest step is moved aside before anything reads it
    info = input_pipeline.get_dataset_info(config)
    train_config.check_before_training(config, info)
    ckpt.class_names = info.label_names  # stored with the checkpoints, for predict
    path = pretrained_path(config)
    pretrained = resolve_pretrained(path) if path is not None else None
    config = _with_preprocessing(config, ckpt, pretrained)
    model = create_model(config, info.num_classes, **_model_overrides(config, ckpt, pretrained))
    tx, schedule = optim.make_optimizer(config)
    strategy = parallel.make_strategy(config, model, tx)
    num_params = sum(x.size for x in jax.tree.leaves(strategy.abstract_state().params))
    logging.info("Model %s with %s parameters, %d classes, %s on %s.", config.model_name,
                 f"{num_params:,}", info.num_classes, strategy, config.dataset)

    start_step = ckpt.latest_step()
    if start_step is not None:
        restored, meta = ckpt.restore(strategy.abstract_state())
        state = strategy.from_saveable(restored)
        _log_config_changes(meta.get("config"), config)
        logging.info("Resumed from %s at step %d.", ckpt.directory, start_step)
    else:
        start_step = 0
        state = strategy.init(jax.random.key(config.seed))
        if pretrained is not None:
            state = _load_pretrained(pretrained, strategy, state, config)
    return Run(config, model, strategy, schedule, state, start_step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains and evaluates a Mixer as `config` says, checkpointing into `workdir`.

    Resumes from the latest checkpoint in `workdir` if there is one. Returns the final
    metrics: 'step', the last training window's 'loss'/'grad_norm'/'learning_rate'/
    'img_per_sec', and the final 'eval_loss', 'eval_top1', 'eval_top5', 'eval_count'.
    Raises NonFiniteLossError (naming the step) if the loss becomes NaN or Inf,
    WorkdirInUseError if another run holds `workdir`, and TrainingInterrupted after
    saving when SIGTERM/SIGINT or a preemption notice stops the run.
    """
    config = train_config.with_defaults(config)
    with contextlib.ExitStack() as stack:
        stack.enter_context(workdir_lock.WorkdirLock(workdir))
        stop = stack.enter_context(_StopSignals())
        ckpt = stack.enter_context(train_checkpoint.TrainCheckpointer(
            workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints))
        with metric_writers.phase("Setting up data, model and parameters"):
            run = prepare(config, ckpt)
        writer = metric_writers.MetricWriter(workdir, resume_step=run.start_step,
                                             config=run.config)
        stack.callback(writer.close)
        finished = run.start_step >= run.config.total_steps
        return _train_loop(run, ckpt, writer, stop,
                           log_final_eval=finished and not _eval_logged(workdir, run.start_step))


def _eval_logged(workdir: str, step: int) -> bool:
    """Whether metrics.jsonl has the eval of `step` (a run killed after its last save has not)."""
    if not epath.Path(workdir, metric_writers.METRICS_FILE).exists():
        return False
    return any(r["step"] == step and "eval_top1" in r for r in metric_writers.read_metrics(workdir))


class _StopSignals:
    """Turns the first SIGTERM/SIGINT into a stop request; the second one kills at once.

    Installed only from the main thread (Python's rule); elsewhere signals keep their
    handlers. `requested(step)` is True on every process at the same step: on several
    hosts the flags are combined each step (one tiny host-to-host exchange).
    """

    def __init__(self):
        self.received = None  # the name of the first signal
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.received is not None:  # second signal: stop now, without saving
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = signal.Signals(signum).name
        logging.warning("%s received: finishing the current step and saving; send it again to "
                        "stop at once without saving.", self.received)

    def requested(self, step: int, ckpt) -> str | None:
        """Why training stops after `step` (a signal or preemption notice), or None."""
        received = self.received is not None
        if jax.process_count() > 1:
            received = bool(np.any(multihost_utils.process_allgather(np.int32(received))))
        if received:
            return self.received or "a signal on another host"
        return "a preemption notice" if ckpt.reached_preemption(step) else None


def _train_loop(run: Run, ckpt, writer, stop: _StopSignals, log_final_eval: bool) -> dict:
    config, strategy, state, start_step = run.config, run.strategy, run.state, run.start_step
    total = config.total_steps
    progress = metric_writers.Progress(total, config.batch, start_step)
    if start_step < total:
        logging.info("Training %s steps %d-%d, global batch %d, on %d %s device(s).",
                     config.model_name, start_step + 1, total, config.batch,
                     jax.device_count(), jax.devices()[0].platform)
    final = {"step": start_step}
    evaluated = False
    pending = []  # device metrics of the steps not yet checked (fetching syncs: done rarely)
    batches = strategy.prefetch(
        input_pipeline.train_dataset(config, start_step=start_step).as_numpy_iterator())
    for step in range(start_step + 1, total + 1):
        if step == start_step + 1:  # the first step compiles: time throughput after it
            with progress.phase("Reading the first batch"):
                batch = next(batches)
            with progress.phase("Compiling and running the first train step"):
                state, metrics = jax.block_until_ready(strategy.train_step(state, batch))
            progress.restart(step)
        else:
            state, metrics = strategy.train_step(state, next(batches))
            if progress.wants_step_lines:  # until the first report: a line per slow step
                jax.block_until_ready(metrics)
        progress.step(step)
        pending.append(metrics)
        last = step == total
        stop_reason = stop.requested(step, ckpt)
        report = step % config.progress_every == 0 or last or stop_reason
        do_eval = (step % config.eval_every == 0 or last) and not stop_reason
        save = step % config.checkpoint_every == 0 or last or stop_reason
        if not (report or do_eval or save):
            continue
        fetched = jax.device_get(pending)
        _check_finite(fetched, step - len(pending) + 1, ckpt)  # never save a bad state
        pending = []
        if report:
            means = _mean_metrics(fetched)
            scalars = {"loss": means.pop("loss"), "learning_rate": float(run.schedule(step - 1)),
                       **means}
            scalars.update(progress.report(step, scalars))
            writer.write(step, scalars)
            final.update(scalars)
        if save:
            ckpt.save(step, strategy.to_saveable(state), config)
        if do_eval:
            scores = _timed_evaluate(strategy, state, config, step, first=not evaluated)
            evaluated = True
            progress.restart(step)  # throughput excludes evaluations
            writer.write(step, scores)
            final.update(scores)
        final["step"] = step
        if stop_reason:
            ckpt.wait()  # the checkpoint of this step is on disk before we say so
            progress.close()
            logging.warning("Stopped by %s after saving step %d in %s; rerun the same command "
                            "to resume (exit status %d: interrupted, resumable).", stop_reason,
                            step, ckpt.directory, INTERRUPTED_EXIT_STATUS)
            raise TrainingInterrupted(step, stop_reason)
    progress.close()
    if start_step >= total:  # resumed a finished run: evaluate it (again)
        scores = evaluate(strategy, state, config)
        if log_final_eval:
            writer.write(start_step, scores)
        final.update(scores)
    ckpt.wait()
    return final


def _timed_evaluate(strategy, state, config, step: int, *, first: bool) -> dict:
    """`evaluate`, logged with its duration (the first one compiles: announced first).
    Top-5 is logged only with more than 5 classes (else it is always 1)."""
    start = time.monotonic()
    if first:
        logging.info("Evaluating at step %d (the first evaluation compiles) ...", step)
    scores = evaluate(strategy, state, config)
    top5 = (f", top-5 {scores['eval_top5']:.4f}"
            if strategy.model.num_classes > 5 else "")
    logging.info("Eval at step %d: top-1 %.4f%s, loss %.4f (%d examples, %.1f s).", step,
                 scores["eval_top1"], top5, scores["eval_loss"], scores["eval_count"],
                 time.monotonic() - start)
    return scores


def _log_config_changes(saved: dict | None, config) -> None:
    """Warns about config values that differ from those the checkpoint was written with."""
    if not saved:
        return
    now = traverse_util.flatten_dict(train_checkpoint.jsonable_config(config), sep=".")
    before = traverse_util.flatten_dict(saved, sep=".")
    changed = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if changed:
        logging.warning("Resuming with a config that differs from the checkpoint's in: %s. "
                        "The run will not match an uninterrupted one.",
                        ", ".join(f"{k} ({before.get(k)!r} -> {now.get(k)!r})" for k in changed))
