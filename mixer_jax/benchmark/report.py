"""Readable tables of benchmark results (the JSON output holds every field)."""
from __future__ import annotations

from typing import Any


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_flops(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} "


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def compute_table(runs: list[dict[str, Any]]) -> str:
    headers = ["mode", "variant", "batch", "micro", "dtype", "img/s", "step ms", "compile s",
               "FLOP/img", "XLA vs analytic", "FLOP/s", "ceiling", "of ceiling", "peak mem"]
    rows = []
    for r in runs:
        xla = r["xla_vs_analytic"]
        xla_text = ("n/a (loop)" if r["xla_counts_loop_body_once"]
                    else "-" if xla is None else f"{xla:+.1%}")
        ceiling = r["ceiling"] or {}
        fraction = "-" if r["of_ceiling"] is None else f"{r['of_ceiling']:.1%}"
        mem = r["memory"]
        rows.append([
            r["mode"], r["variant"], r["batch"], r["microbatch"] or "-", r["dtype"],
            f"{r['images_per_s']:.2f}", f"{r['step_s'] * 1e3:.1f}", f"{r['compile_s']:.1f}",
            human_flops(r["flops_per_step"] / r["batch"]), xla_text,
            human_flops(r["achieved_flops_per_s"]), human_flops(ceiling.get("flops_per_s")),
            fraction,
            human_bytes(mem["device_peak_bytes"] or mem["compiled_peak_bytes"]),
        ])
    return table(headers, rows)


def ceiling_line(run: dict[str, Any]) -> str:
    ceiling = run["ceiling"]
    sizes = ", ".join(f"{n}: {human_flops(f)}FLOP/s" for n, f in ceiling["by_size"].items())
    return (f"{run['mode']} ceiling: {human_flops(ceiling['flops_per_s'])}FLOP/s at "
            f"n = {ceiling['size']} ({ceiling['dtype']} n x n matmuls timed after each step, "
            f"{ceiling['statistic']} of {ceiling['calls_per_size']} calls per size: {sizes})")


def sharding_table(results: list[dict[str, Any]]) -> str:
    headers = ["devices", "strategy", "params/dev", "optimizer/dev", "args/dev (compiled)",
               "temp/dev", "total/dev"]
    rows = [[r["devices"], r["strategy"], human_bytes(r["param_bytes"]),
             human_bytes(r["optimizer_bytes"]), human_bytes(r["argument_bytes"]),
             human_bytes(r["temp_bytes"]), human_bytes(r["total_bytes"])] for r in results]
    return table(headers, rows)


def pipeline_table(results: list[dict[str, Any]]) -> str:
    headers = ["dataset", "global batch", "host batch", "crop", "batch ms", "img/s"]
    rows = [[r["dataset"], r["batch"], r["host_batch"], r["crop"],
             f"{r['batch_s'] * 1e3:.1f}", f"{r['images_per_s']:.1f}"] for r in results]
    return table(headers, rows)


def compare_table(rows: list[dict[str, Any]]) -> str:
    headers = ["mode", "variant", "timm model", "batch", "dtype", "mixer_jax img/s",
               "timm img/s", "mixer_jax / timm", "steps x rounds"]
    return table(headers, [[r["mode"], r["variant"], r["timm_name"], r["batch"], r["dtype"],
                            f"{r['mixer_jax_images_per_s']:.1f}", f"{r['timm_images_per_s']:.1f}",
                            f"{r['ratio']:.2f}x", f"{r['steps']} x {r['rounds']}"]
                           for r in rows])


def mix_table(rows: list[dict[str, Any]], train_step_s: float | None) -> str:
    """Time per call of each mixing method, and its share of a training step if given."""
    headers = ["method", "variant", "batch", "mode", "ms", "of train step"]
    return table(headers, [
        [r["method"], r["variant"], r["batch"], r["mode"], f"{1e3 * r['step_s']:.2f}",
         f"{r['step_s'] / train_step_s:.2%}" if train_step_s else "-"] for r in rows])
