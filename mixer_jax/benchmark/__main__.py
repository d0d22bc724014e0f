"""Benchmark command line.

  python -m mixer_jax.benchmark --variant=Mixer-B_16 --batch=32 --dtype=float32 \\
      --mode=inference,train [--config=configs/x.py --mode=pipeline] \\
      [--mode=sharding --mesh=8,64,256] [--mode=train,mix] [--json=results.json]
  python -m mixer_jax.benchmark --variant=Mixer-S_32 --batch=32 --mode=train \\
      --compare=timm [--compare_rounds=2] [--timm_model=mixer_s32_224]

Modes (comma-separated, run in this order):
  inference  a forward pass on `--batch` images on one device;
  train      a full training step (loss, gradients, optimizer update) likewise;
  pipeline   `input_pipeline.train_dataset(--config)` alone, images/s on this host;
  sharding   per-device parameter/optimizer/step memory, data parallel vs FSDP, on
             each mesh size of `--mesh` (simulated CPU devices; nothing allocated);
  mix        each mixed-sample augmentation method alone (`mixer_jax.mix`, `--mix_mode`)
             on the per-device batch; with `train`, also as a fraction of its step.
`--batch` is always the per-device batch; `--microbatch` computes it in pieces
(inference via `steps.forward`, training via gradient accumulation: the same
update). Without `--ceiling=false`, the dense-matmul ceiling is measured in the
same run and dtype: square matmuls of each `--ceiling_sizes` are timed after
every step, the fastest size is the ceiling, and "of ceiling" compares the step
with it (`measure.time_with_ceiling` says how a step's tail is charged to it).
`--variant` is any registered name (`mixer_jax.models.list_models()`).
`--compare=timm` times inference/train side by side with timm instead (same model,
batch, dtype and mode; each framework in its own process, alternately; medians;
img/s of both and their ratio; see `compare.py`).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
from absl import flags
from ml_collections import config_flags

from mixer_jax import cli, host_memory, mix, models, parallel
from mixer_jax.benchmark import compare, measure, mixing, pipeline, report, sharding
from mixer_jax.errors import UserError

MODES = ("inference", "train", "pipeline", "sharding", "mix")


class BenchmarkError(UserError, ValueError):
    """A bad combination of benchmark flags."""


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
    """Defines the command's flags on `fv` (a private FlagValues: importable anywhere).

    `argv` is the command line to be parsed: config_flags finds the `--config.x`
    overrides in it."""
    flags.DEFINE_list("mode", ["inference"], f"Comma-separated modes among {MODES}.",
                      flag_values=fv)
    flags.DEFINE_string("variant", None, "Any registered model name, e.g. Mixer-B_16 "
                        "(default: the config's model_name, else Mixer-B_16).", flag_values=fv)
    flags.DEFINE_enum("compare", None, ["timm"], "Time inference/train side by side with "
                      "this framework (each in its own process, alternately).", flag_values=fv)
    flags.DEFINE_integer("compare_rounds", 2, "--compare: alternations (A B) per mode.",
                         flag_values=fv)
    flags.DEFINE_string("timm_model", None, "--compare=timm: timm's model name (default: "
                        "the family's timm name of --variant, else --variant).", flag_values=fv)
    flags.DEFINE_integer("batch", None, "Images per device per step (default: the config's "
                         "batch split over the devices, else 32).", flag_values=fv)
    flags.DEFINE_integer("image_size", None, "Image side (default: the config's pp.crop, "
                         "else 224).", flag_values=fv)
    flags.DEFINE_enum("dtype", "float32", list(measure.DTYPES), "Compute dtype.",
                      flag_values=fv)
    flags.DEFINE_integer("microbatch", None, "Images per piece of the batch (default: the "
                         "whole batch at once). On CPUs cache-sized pieces run faster.",
                         flag_values=fv)
    flags.DEFINE_integer("steps", 10, "Timed steps (after one warm-up).", flag_values=fv)
    flags.DEFINE_enum("statistic", "median", list(measure.STATISTICS), "Step time used for "
                      "throughput, for the model and the ceiling alike ('min' suits a "
                      "machine shared with other work).", flag_values=fv)
    flags.DEFINE_bool("scan", False, "nn.scan over blocks.", flag_values=fv)
    flags.DEFINE_bool("remat", False, "Rematerialise blocks in the backward pass.",
                      flag_values=fv)
    flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd"], "Optimizer of the training "
                      "step (adam: 2 states per parameter, sgd momentum: 1).", flag_values=fv)
    flags.DEFINE_bool("ceiling", True, "Measure the dense-matmul ceiling.", flag_values=fv)
    flags.DEFINE_list("ceiling_sizes", [], "Square matmul sizes for the ceiling "
                      "(default: 1024,2048,4096 on CPU, 4096,8192,16384 elsewhere).",
                      flag_values=fv)
    flags.DEFINE_list("mesh", ["8"], "Device counts for --mode=sharding.", flag_values=fv)
    flags.DEFINE_integer("fsdp_min_size", parallel.DEFAULT_FSDP_MIN_SIZE, "FSDP keeps "
                         "arrays with fewer elements replicated.", flag_values=fv)
    flags.DEFINE_bool("sharding_scan", True, "Scanned blocks in sharding mode, for the isotropic families (compiles "
                      "fast for deep models; memory is the same).", flag_values=fv)
    flags.DEFINE_integer("pipeline_batches", 20, "Timed batches in pipeline mode.",
                         flag_values=fv)
    flags.DEFINE_enum("mix_mode", "batch", list(mix.MODES), "config.mix.mode timed by "
                      "--mode=mix.", flag_values=fv)
    flags.DEFINE_string("json", None, "Also write all results as JSON to this path "
                        "('-': stdout instead of the tables).", flag_values=fv)
    config_flags.DEFINE_config_file("config", None, "Training config (needed for "
                                    "--mode=pipeline; sets variant and image size defaults).",
                                    flag_values=fv, lock_config=False, sys_argv=argv)


def environment() -> dict[str, Any]:
    device = jax.devices()[0]
    return {"jax": jax.__version__, "platform": device.platform,
            "device_kind": device.device_kind, "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def run(fv: flags.FlagValues) -> dict[str, Any]:
    """Runs the requested modes; returns every result (JSON-serialisable)."""
    modes = list(fv.mode)
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise BenchmarkError(f"Unknown mode(s) {unknown}; known: {', '.join(MODES)}.")
    config = fv.config
    if "pipeline" in modes and config is None:
        raise BenchmarkError("--mode=pipeline needs --config=<training config file>.")
    variant = fv.variant or (config.get("model_name") if config else None) or "Mixer-B_16"
    if models.registry.canonical_name(variant) not in models.list_models():
        raise BenchmarkError(f"Unknown variant {variant!r}; `mixer_jax.models.list_models()` "
                             "lists every name.")
    image_size = fv.image_size or (config.pp.crop if config else 224)

    def per_device_batch(devices: int) -> int:  # the config's global batch split, else 32
        return fv.batch or (max(1, config.batch // devices) if config else 32)

    results: dict[str, Any] = {"environment": environment(), "runs": [], "sharding": [],
                               "pipeline": [], "mix": [], "compare": []}
    sizes = (tuple(int(s) for s in fv.ceiling_sizes) or None) if fv.ceiling else ()
    for mode in (m for m in modes if m in ("inference", "train") and fv.compare):
        results["compare"].append(compare.compare_timm(
            variant, mode=mode, batch=per_device_batch(1), dtype=fv.dtype,
            image_size=image_size, steps=fv.steps, rounds=fv.compare_rounds,
            timm_model=fv.timm_model, optimizer=fv.optimizer, microbatch=fv.microbatch))
    for mode in (m for m in modes if m in ("inference", "train") and not fv.compare):
        results["runs"].append(measure.benchmark_model(
            variant, mode=mode, batch=per_device_batch(jax.device_count()), dtype=fv.dtype,
            image_size=image_size, steps=fv.steps, scan=fv.scan, remat=fv.remat,
            optimizer=fv.optimizer, microbatch=fv.microbatch, statistic=fv.statistic,
            ceiling_sizes=sizes))
    if "mix" in modes:
        results["mix"] = mixing.benchmark_mixing(
            variant, batch=per_device_batch(jax.device_count()), image_size=image_size,
            steps=fv.steps, mode=fv.mix_mode, statistic=fv.statistic)
    if "pipeline" in modes:
        results["pipeline"].append(pipeline.benchmark_pipeline(
            config, batches=fv.pipeline_batches))
    if "sharding" in modes:
        for n in (int(s) for s in fv.mesh):
            for strategy in sharding.STRATEGIES:
                results["sharding"].append(sharding.sharding_memory(
                    variant, num_devices=n, batch_per_device=per_device_batch(n),
                    strategy=strategy, dtype=fv.dtype, image_size=image_size,
                    optimizer=fv.optimizer, remat=fv.remat,
                    scan=fv.sharding_scan and measure.scannable(variant),
                    fsdp_min_size=fv.fsdp_min_size))
    return results


def format_results(results: dict[str, Any]) -> str:
    """The human-readable report: environment, one table per kind of result, ceilings."""
    env = results["environment"]
    parts = [f"jax {env['jax']} on {env['device_count']} x {env['device_kind']} "
             f"({env['platform']}, {env['cpu_count']} host CPUs)"]
    if results["runs"]:
        parts.append(report.compute_table(results["runs"]))
        ceilings = [report.ceiling_line(r) for r in results["runs"] if r["ceiling"]]
        if ceilings:
            parts.append("\n".join(ceilings))
    if results.get("compare"):
        parts.append("side by side with timm (each in its own process, alternately; "
                     "medians):\n" + report.compare_table(results["compare"]))
    if results.get("mix"):
        train = [r for r in results["runs"] if r["mode"] == "train"]
        parts.append("mixed-sample augmentation, each method alone:\n" + report.mix_table(
            results["mix"], train[0]["step_s"] if train else None))
    if results["pipeline"]:
        parts.append("input pipeline (training preprocessing, this host):\n"
                     + report.pipeline_table(results["pipeline"]))
        train = [r for r in results["runs"] if r["mode"] == "train"]
        if train:
            need = train[0]["images_per_s"] * jax.local_device_count()
            have = results["pipeline"][0]["images_per_s"]
            parts.append(f"training consumes {need:.1f} img/s on this host's "
                         f"{jax.local_device_count()} device(s); the pipeline delivers "
                         f"{have:.1f}: {'input' if have < need else 'compute'} bound.")
    if results["sharding"]:
        first = results["sharding"][0]
        parts.append(f"per-device training-step memory, {first['variant']}, "
                     f"{first['optimizer']}, per-device batch {first['batch_per_device']}, "
                     f"{first['image_size']}px, {first['dtype']} compute:\n"
                     + report.sharding_table(results["sharding"]))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parses `argv` (default sys.argv), runs, prints the report; returns the results."""
    argv = sys.argv if argv is None else ["benchmark", *argv]
    fv = flags.FlagValues()
    argv = cli.with_config_paths(argv)
    define_flags(fv, argv)
    if {"-h", "--help", "--helpfull"} & set(argv[1:]):
        print(__doc__ + "\nFlags:\n" + fv.get_help())
        return {}
    cli.parse_flags(argv, fv)
    if "sharding" in fv.mode:
        try:  # simulated devices for the mesh; only possible before jax starts
            jax.config.update("jax_num_cpu_devices", max(int(n) for n in fv.mesh))
        except RuntimeError:
            pass  # already started (e.g. inside tests): use the devices there are
    results = run(fv)
    if fv.json:
        text = json.dumps(results, indent=2)
        if fv.json == "-":
            print(text)
        else:
            with open(fv.json, "w") as f:
                f.write(text + "\n")
    if fv.json != "-":
        print(format_results(results))
    return results


if __name__ == "__main__":
    host_memory.retain_freed_memory()
    cli.run(lambda argv: main(argv[1:]) and None)
