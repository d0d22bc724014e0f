"""Command line: train / fine-tune / evaluate a Mixer.

  python -m mixer_jax.main --config=configs/default.py --workdir=/tmp/mixer_digits
  python -m mixer_jax.main --config=configs/mixer_b16_cifar10.py --workdir=gs://bucket/run \\
      --config.pretrained_dir=gs://mixer_models/imagenet21k --config.batch=256

Every config key can be overridden with `--config.<key>=<value>`. Starting the same
command again resumes from the latest checkpoint in the workdir. On several hosts,
run the same command on every host (see docs/training.md); `jax.distributed` is
initialised from the flags below, the environment, or TPU / SLURM auto-detection.
"""
from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mixer_jax import host_memory, metric_writers, parallel, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config file (e.g. configs/default.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints and metrics.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-process runs: host:port of process 0 (else JAX_COORDINATOR_ADDRESS "
                    "or auto-detection).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: index of this process.")
flags.DEFINE_bool("distributed", False,
                  "Initialise jax.distributed even when nothing says this is a multi-process "
                  "launch (Cloud TPU VM pod slices, where jax finds the topology itself).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # Before anything touches a jax backend (importing jax does not).
    parallel.maybe_initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
        force=FLAGS.distributed)
    metric_writers.quiet_library_logs()
    logging.info("Process %d of %d, %d local / %d global devices (%s).", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)
    logging.info("Config:\n%s", FLAGS.config)
    final = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    logging.info("Final metrics: %s", final)


if __name__ == "__main__":
    host_memory.retain_freed_memory()
    app.run(main)
