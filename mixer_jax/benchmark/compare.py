"""mixer_jax side by side with timm (`--compare=timm`): the same model, batch, dtype and
mode, each framework timed in its own process, alternately (A B A B ...).

One process per framework and run: in one process each framework's idle thread pool
slows the other down. Alternating gives both the same conditions on a machine whose
speed drifts. Each process compiles / warms up, then times `steps` calls; the figures
are the medians over all timed calls of all rounds.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from typing import Any

from mixer_jax import models


def timm_name(variant: str) -> str:
    """timm's name of a registered model (`Family.timm_names`, else the name itself)."""
    family = models.get_family(variant)
    name = models.registry.canonical_name(variant)
    return dict(family.timm_names).get(name, name)


def _json_of(command: list[str], timeout_s: float) -> dict:
    done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    text = done.stdout
    return json.loads(text[text.index("{"):])  # stdout holds the JSON only; logs: stderr


def compare_timm(variant: str, *, mode: str, batch: int, dtype: str = "float32",
                 image_size: int = 224, steps: int = 5, rounds: int = 2,
                 timm_model: str | None = None, optimizer: str = "adam",
                 microbatch: int | None = None, timeout_s: float = 1800) -> dict[str, Any]:
    """Times `variant` in mixer_jax and timm, alternately `rounds` times each."""
    if importlib.util.find_spec("timm") is None or importlib.util.find_spec("torch") is None:
        raise ValueError("--compare=timm needs torch and timm installed "
                         "(pip install 'mixer_jax[test]').")
    if optimizer != "adam":
        raise ValueError("--compare=timm times an AdamW training step on both sides; use "
                         "--optimizer=adam.")
    other = timm_model or timm_name(variant)
    ours_cmd = ["mixer_jax.benchmark", f"--variant={variant}", f"--mode={mode}",
                f"--batch={batch}", f"--dtype={dtype}", f"--image_size={image_size}",
                f"--steps={steps}", "--ceiling=false", "--json=-", "--optimizer=adam"]
    if microbatch:
        ours_cmd.append(f"--microbatch={microbatch}")
    theirs_cmd = ["mixer_jax.benchmark.timm_side", f"--name={other}", f"--mode={mode}",
                  f"--batch={batch}", f"--dtype={dtype}", f"--image_size={image_size}",
                  f"--steps={steps}"]
    ours, theirs, info = [], [], {}
    for _ in range(rounds):
        ours += _json_of(ours_cmd, timeout_s)["runs"][0]["step_times_s"]
        result = _json_of(theirs_cmd, timeout_s)
        theirs += result["step_times_s"]
        info = {k: result[k] for k in ("torch", "timm", "threads")}
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    return {
        "variant": variant, "timm_name": other, "mode": mode, "batch": batch, "dtype": dtype,
        "image_size": image_size, "steps": steps, "rounds": rounds, "microbatch": microbatch,
        "mixer_jax_step_times_s": ours, "timm_step_times_s": theirs,
        "mixer_jax_images_per_s": batch / ours_s, "timm_images_per_s": batch / theirs_s,
        "ratio": theirs_s / ours_s,  # > 1: mixer_jax is faster
        **info,
    }
