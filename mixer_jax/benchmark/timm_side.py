"""The timm half of `--compare=timm`: times one timm model in this process, prints JSON.

  python -m mixer_jax.benchmark.timm_side --name=mixer_b16_224 --mode=train --batch=8 \\
      --steps=5 [--dtype=float32] [--image_size=224]

Run by `compare.compare_timm` in its own process (one framework per process: in one
process each framework's idle thread pool slows the other). torch and timm are
imported here only, when this runs: they are test/benchmark extras, not dependencies.
Training is timm's usual step: forward, cross-entropy, backward, AdamW update
(weight decay 0.1, as the 'adam' recipe of `measure.OPTIMIZER_RECIPES`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def benchmark(name: str, *, mode: str, batch: int, steps: int, dtype: str = "float32",
              image_size: int = 224, warmup: int = 2) -> dict:
    import timm  # noqa: PLC0415
    import torch  # noqa: PLC0415

    kwargs = {} if image_size == 224 else {"img_size": image_size}
    model = timm.create_model(name, pretrained=False, **kwargs)
    images = torch.rand(batch, 3, image_size, image_size) * 2 - 1
    labels = torch.arange(batch) % model.num_classes
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    if mode == "inference":
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model(images)
    else:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

        def step():
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"name": name, "mode": mode, "batch": batch, "dtype": dtype,
            "image_size": image_size, "step_times_s": times,
            "median_s": statistics.median(times), "torch": torch.__version__,
            "timm": timm.__version__, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--mode", choices=("inference", "train"), default="inference")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--image_size", type=int, default=224)
    args = parser.parse_args(argv)
    print(json.dumps(benchmark(args.name, mode=args.mode, batch=args.batch, steps=args.steps,
                               dtype=args.dtype, image_size=args.image_size)))


if __name__ == "__main__":
    main()
