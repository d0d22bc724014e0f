"""Where training metrics go: TensorBoard event files, `metrics.jsonl`, progress lines.

Only process 0 writes (every host computes the same global metrics). Both files
live in the workdir, so a run resumed there keeps one history: on resume,
records after the restored step (written by the crashed attempt) are dropped
from `metrics.jsonl`; TensorBoard shows the latest value per step anyway.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import sys
import time
from typing import Callable, Mapping

import jax
import tensorflow as tf
from absl import logging
from tensorflow.core.framework import summary_pb2
from tensorflow.core.util import event_pb2

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"  # the complete config of the run (printed only with --verbose)
# What `tf.summary.scalar` attaches; written directly because that function lives in the
# tensorboard package, which is not needed to write event files.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
).SerializeToString()


class MetricWriter:
    """Writes scalar dicts per step to TensorBoard and to `<workdir>/metrics.jsonl`
    (and, given `config`, the run's config to `<workdir>/config.json`)."""

    def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool | None = None,
                 config=None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._path = f"{workdir}/{METRICS_FILE}"
        if not self.enabled:
            return
        tf.io.gfile.makedirs(workdir)
        if config is not None:
            with tf.io.gfile.GFile(f"{workdir}/{CONFIG_FILE}", "w") as f:
                f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
        kept = _records_up_to(self._path, resume_step)
        # Rewritten rather than appended to: GCS files cannot be appended to.
        self._file = tf.io.gfile.GFile(self._path, "w")
        self._file.write("".join(kept))
        self._file.flush()
        self._summary = tf.summary.create_file_writer(workdir)

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Records `scalars` (name -> number) for `step`."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        with self._summary.as_default(step=int(step)):
            for name, value in scalars.items():
                tf.summary.write(name, tf.constant(float(value), tf.float32),
                                 metadata=_SCALAR_METADATA)
        self._summary.flush()  # reports are rare; a killed run keeps them all

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._summary.close()


def read_metrics(workdir: str) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl`, in order."""
    with tf.io.gfile.GFile(f"{workdir}/{METRICS_FILE}") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_event_scalars(workdir: str) -> list[tuple[int, str, float]]:
    """(step, name, value) of every scalar in the TensorBoard event files of `workdir`."""
    found = []
    for path in sorted(tf.io.gfile.glob(f"{workdir}/events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            found += [(event.step, v.tag, float(tf.make_ndarray(v.tensor)))
                      for v in event.summary.value]
    return found


def _records_up_to(path: str, step: int) -> list[str]:
    """Lines of an existing metrics file with a step <= `step` (a crashed attempt's are dropped)."""
    if not tf.io.gfile.exists(path):
        return []
    kept = []
    with tf.io.gfile.GFile(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a hard kill
                continue
            if record["step"] <= step:
                kept.append(json.dumps(record) + "\n")
    return kept


class Progress:
    """Progress from the first second: start-up phases, steps, throughput and time left.

    - `phase(what)` times a start-up phase: "what ..." when it starts, "what: 41.2 s" when
      it ends (the first batch, compiling the train step, the first evaluation);
    - `step(step)` after every step: until the first `report`, a line for every step
      that ends at least `early_every` seconds after the previous line (so slow runs
      show each step, fast ones stay quiet); in a notebook a live bar (tqdm) instead;
    - `report(step, metrics)` every `progress_every` steps: the full line.

    Throughput is measured between consecutive lines; call `restart` once the first step
    has run so that compilation does not count.
    """

    def __init__(self, total_steps: int, global_batch: int, start_step: int = 0,
                 log: Callable[[str], None] = logging.info, clock=time.monotonic, *,
                 early_every: float = 2.0, bar: bool | None = None):
        self.total_steps = total_steps
        self.global_batch = global_batch
        self._log = log if jax.process_index() == 0 else (lambda line: None)
        self._clock = clock
        self._last_step = start_step
        self._last_time = clock()
        self._early_every = early_every
        self._figures = None  # of the last line
        self._reported = False
        bar = in_notebook() if bar is None else bar
        self._bar = None
        if bar and jax.process_index() == 0:
            self._bar = _tqdm()(total=total_steps, initial=start_step, unit="step",
                                dynamic_ncols=True)

    def phase(self, what: str):
        """`phase(what)` logged with this object's log and clock."""
        return phase(what, log=self._log, clock=self._clock)

    def restart(self, step: int) -> None:
        """Measures from now on, `step` being done."""
        self._last_step, self._last_time = step, self._clock()
        self._figures = None

    @property
    def wants_step_lines(self) -> bool:
        """Whether `step` may print (before the first report): the caller then syncs."""
        return not self._reported and self._bar is None

    def step(self, step: int) -> None:
        """After each step (synchronised with the device when `wants_step_lines`)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            return
        if self.wants_step_lines and self._clock() - self._last_time >= self._early_every:
            self._log(self._line(step, {})[0])

    def report(self, step: int, metrics: Mapping[str, float]) -> dict:
        """Logs one line for `step`; returns the throughput figures it computed."""
        self._reported = True
        line, figures = self._line(step, metrics)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(line.split(" | ", 1)[1], refresh=True)
        else:
            self._log(line)
        return figures

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def _line(self, step: int, metrics: Mapping[str, float]) -> tuple[str, dict]:
        now = self._clock()
        if step == self._last_step and self._figures:  # a step line just measured it
            figures = self._figures
        else:
            steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
            self._last_step, self._last_time = step, now
            figures = {"img_per_sec": steps_per_sec * self.global_batch,
                       "steps_per_sec": steps_per_sec}
        self._figures = figures
        steps_per_sec = figures["steps_per_sec"]
        eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else math.inf
        width = len(str(self.total_steps))
        parts = [f"step {step:>{width}}/{self.total_steps}"]
        parts += [f"{k} {v:.4g}" for k, v in metrics.items()]
        parts += [f"{figures['img_per_sec']:.1f} img/s", f"ETA {format_duration(eta)}"]
        return " | ".join(parts), figures


@contextlib.contextmanager
def phase(what: str, log: Callable[[str], None] | None = None, clock=time.monotonic):
    """Logs `what ...` (process 0), runs the block, then logs `what: 12.3 s`."""
    log = log or (logging.info if jax.process_index() == 0 else (lambda line: None))
    log(f"{what} ...")
    start = clock()
    yield
    log(f"{what}: {clock() - start:.1f} s")


def _tqdm():
    """tqdm's widget bar where ipywidgets is installed (Colab), else its text bar."""
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm
    else:
        from tqdm import tqdm
    return tqdm


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where a live progress bar replaces step lines)."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and "IPKernelApp" in getattr(shell, "config", {})


def format_duration(seconds: float) -> str:
    """12345 -> '3h25m45s'; inf -> '?'."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
