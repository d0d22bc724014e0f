"""Top-1 of no mixing and of each mixing method on a data-poor split of the embedded digits.

  python -m mixer_jax.mix_compare --model=Mixer-Ti_4 [--seeds=3] [--steps=200] \\
      [--train_split="train[:15%]"] [--methods=none,mixup,cutmix,...] [--json=out.json]

Every run is `configs/default.py` (trained from scratch, offline) with the model, split,
step budget and seed given, and one method switched on (`mix.SETTINGS`), evaluated
on the whole test split (360 images). Prints a markdown table: mean and standard
deviation over the seeds, and each seed's top-1. Any registered model name works
(`--model`), built with its family's digits-sized `Family.tiny` overrides.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile

from mixer_jax import demo, mix, models, train

METHOD_SETTINGS = {"none": {}, **mix.SETTINGS}  # config.mix values of each run


def run_config(model: str, method: str, seed: int, steps: int, train_split: str):
    """The default config with `model`, `train_split`, `steps`, `seed` and `method` on."""
    config = demo.load_config("default")
    config.model_name = model
    config.model.update(dict(models.get_family(model).tiny))  # digits-sized (16x16 images)
    config.pp.train = train_split
    config.seed = seed
    config.total_steps = steps
    config.warmup_steps = min(config.warmup_steps, steps // 10)
    config.progress_every = config.eval_every = config.checkpoint_every = steps
    config.keep_checkpoints, config.async_checkpoints = 1, False
    config.mix.update(METHOD_SETTINGS[method])
    return config


def compare(model: str, methods, seeds: int, steps: int, train_split: str, log=print) -> dict:
    """{method: [top-1 of each seed]}."""
    results = {}
    for method in methods:
        results[method] = []
        for seed in range(seeds):
            with tempfile.TemporaryDirectory() as workdir:
                final = train.train_and_evaluate(
                    run_config(model, method, seed, steps, train_split), workdir)
            results[method].append(final["eval_top1"])
            log(f"{model} {method} seed {seed}: top-1 {final['eval_top1']:.4f}")
    return results


def markdown(results: dict, model: str) -> str:
    seeds = len(next(iter(results.values())))
    lines = [f"| {model} | top-1 % (mean ± std) | " + " | ".join(f"seed {s}" for s in range(seeds))
             + " |", "|---|---|" + "---|" * seeds]
    for method, scores in results.items():
        pct = [100 * s for s in scores]
        spread = statistics.stdev(pct) if len(pct) > 1 else 0.0
        lines.append(f"| {method} | {statistics.mean(pct):.1f} ± {spread:.1f} | "
                     + " | ".join(f"{p:.1f}" for p in pct) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Mixer-Ti_4", help="registered model name")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="training steps per run")
    parser.add_argument("--train_split", default="train[:15%]")
    parser.add_argument("--methods", default=",".join(METHOD_SETTINGS),
                        help=f"comma-separated, among {', '.join(METHOD_SETTINGS)}")
    parser.add_argument("--json", help="also write the top-1 values to this file")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHOD_SETTINGS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(METHOD_SETTINGS)}")
    results = compare(args.model, methods, args.seeds, args.steps, args.train_split,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"{args.model}, {args.steps} steps of batch 128 on digits {args.train_split}, "
          f"{args.seeds} seeds, top-1 on the 360 test images:\n")
    print(markdown(results, args.model))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "steps": args.steps, "train_split": args.train_split,
                       "top1": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
