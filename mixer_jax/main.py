"""Command line: train / fine-tune / evaluate a Mixer.

  python -m mixer_jax.main --config=default --workdir=/tmp/mixer_digits
  python -m mixer_jax.main --config=mixer_b16_cifar10 --workdir=gs://bucket/run \\
      --config.pretrained_dir=gs://mixer_models/imagenet21k --config.batch=256

`--config` takes a shipped config's name (they are installed with the package) or the
path of a config file. Every config key can be overridden with `--config.<key>=<value>`. Starting the same
command again resumes from the latest checkpoint in the workdir. On several hosts,
run the same command on every host (see docs/training.md); `jax.distributed` is
initialised from the flags below, the environment, or TPU / SLURM auto-detection.
The console shows what the run is, its progress, evaluations and where results went;
the full config is written to `<workdir>/config.json` (and printed with --verbose).
"""
from __future__ import annotations

import os

from absl import flags, logging
from ml_collections import config_flags

from mixer_jax import cli, host_memory, parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config: a shipped config's name (default, mixer_b16_cifar10, "
    "mixer_b16_folder, mixer_b16_imagenet_pretrain) or a config file, with an optional "
    ":argument.", lock_config=True)
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


def main(argv: list[str]) -> None:
    argv = cli.parse_flags(cli.with_config_paths(argv))
    if len(argv) > 1:
        raise cli.FlagError(f"Unexpected arguments: {' '.join(argv[1:])}")
    # Before anything touches a jax backend (importing jax does not).
    parallel.maybe_initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
        force=FLAGS.distributed)
    from mixer_jax import train  # TensorFlow: after the flags (--verbose shows its lines)

    if FLAGS.verbose:
        logging.info("Config:\n%s", FLAGS.config)
    # orbax needs absolute local paths ("wd" would fail at the first checkpoint)
    workdir = FLAGS.workdir if "://" in FLAGS.workdir else os.path.abspath(FLAGS.workdir)
    final = train.train_and_evaluate(FLAGS.config, workdir)
    logging.info("%s", summary(final, workdir))


def summary(final: dict, workdir: str) -> str:
    """The last line of a run: where it stopped, its final scores, where results are."""
    what = "Stopped (preempted; rerun to resume)" if final.get("preempted") else "Done"
    scores = (f": test top-1 {final['eval_top1']:.2%}, loss {final['eval_loss']:.4f}"
              if "eval_top1" in final else "")
    return (f"{what} at step {final['step']}{scores}. Checkpoints, metrics.jsonl, config.json "
            f"and TensorBoard events are in {workdir}.")


if __name__ == "__main__":
    host_memory.retain_freed_memory()
    cli.run(main)
