"""Renders a benchmark JSON as the seed's performance table (markdown) and a bar chart (PNG).

    python experiments/render.py experiments/results/h100.json   # writes h100.md and h100.png beside it
    python experiments/render.py experiments/results/h100.json experiments/results/imagenet_val.json

Top-1/Top-5 come from an accuracy JSON of experiments/imagenet_accuracy.py when one is given; else
they are the published figures of the converted weights (timm's ImageNet validation), marked as
such: converted weights reproduce timm's logits, so the figures carry over. Below the seed's table
come the speed ratios against timm (the targets of the benchmark issue) and the roofline.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

MODES = [("jit", "JAX jit"), ("eager", "JAX eager"), ("timm_eager", "timm eager"), ("timm_compiled", "timm compile")]


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return "-" if numerator is None or not denominator else f"{numerator / denominator:.2f}x"


def _accuracy(name: str, measured: dict[str, Any] | None) -> list[str]:
    from res2net_jax import get_spec

    if measured and name in measured["models"]:
        return [f"{measured['models'][name]['top1']:.2f}", f"{measured['models'][name]['top5']:.2f}"]
    spec = get_spec(name)
    return [f"{spec.top1:.2f}*", f"{spec.top5:.2f}*"] if spec.top1 else ["-", "-"]


def table(report: dict[str, Any], measured: dict[str, Any] | None = None) -> str:
    """The seed's columns (accuracy, train s/epoch, inference ms per batch of 32 and of 1, per mode), the
    ratios against timm and the roofline."""
    settings = report["settings"]
    dtypes = sorted({f["compute_dtype"] for modes in report["models"].values() for f in modes.values()
                     if "compute_dtype" in f})  # fmt: skip
    lines = [
        f"{report['card']}, {report['date']}, batch {settings['batch']}, {settings['image_size']} px"
        + "".join(f", {dtype}" for dtype in dtypes) + "; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        *(["**Incomplete: the run was cut short; '-' marks what it did not reach.**", ""]
          if report.get("complete") is False else []),
    ]  # fmt: skip
    lines += [
        "| model | top-1 | top-5 | " + " | ".join(f"train s/epoch ({label})" for _, label in MODES)
        + " | " + " | ".join(f"infer ms/32 ({label})" for _, label in MODES)
        + " | " + " | ".join(f"infer ms/1 ({label})" for _, label in MODES) + " |",
        "|---" * (3 + 3 * len(MODES)) + "|",
    ]  # fmt: skip
    reduced = settings.get("layers", "the model's own") not in ("the model's own", [])  # a smoke run's blocks
    for name, modes in report["models"].items():
        epochs = [_number(modes.get(mode, {}).get("s_per_epoch"), 0) for mode, _ in MODES]
        latency = [
            _number(modes.get(mode, {}).get(key)) for key in ("infer_b32_ms", "infer_b1_ms") for mode, _ in MODES
        ]
        accuracy = ["-", "-"] if reduced else _accuracy(name, measured)  # the published figures are full-size's
        label = f"{name} (layers {','.join(map(str, settings['layers']))})" if reduced else name
        lines.append(f"| {label} | " + " | ".join(accuracy + epochs + latency) + " |")
    failures = [f"{name} {mode}: {figures['error']}" for name, modes in report["models"].items()
                for mode, figures in modes.items() if "error" in figures]  # fmt: skip
    for failure in failures:
        lines += ["", f"Failed ('-' in its columns): {failure}"]
    if measured:
        lines += ["", f"Top-1/top-5 measured on {measured['settings']['dataset']} ({measured['date']})."]
    else:
        lines += ["", "\\* published ImageNet-1k figures of the converted timm weights, not measured here."]
    lines += [
        "",
        "JAX jit against timm (targets for res2net50 on a GPU: train >= 1.5x eager and >= 1.25x compiled, "
        "inference >= 1.8x eager, batch-1 latency <= 0.5x eager, memory <= 1x):",
        "",
        f"| model | train / timm eager | train / timm compile | infer b{settings['batch']} / timm eager "
        "| b1 latency / timm eager | peak memory / timm eager |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, modes in report["models"].items():
        jit, eager, compiled = (modes.get(m, {}) for m in ("jit", "timm_eager", "timm_compiled"))
        lines.append(
            f"| {name} | {_ratio(jit.get('train_img_s'), eager.get('train_img_s'))} "
            f"| {_ratio(jit.get('train_img_s'), compiled.get('train_img_s'))} "
            f"| {_ratio(jit.get('infer_b256_img_s'), eager.get('infer_b256_img_s'))} "
            f"| {_ratio(jit.get('infer_b1_ms'), eager.get('infer_b1_ms'))} "
            f"| {_ratio(jit.get('peak_mem_gb'), eager.get('peak_mem_gb'))} |"
        )
    variants = sorted({mode for modes in report["models"].values() for mode in modes if mode.startswith("jit:")})
    if variants:
        lines += ["", "Levers (experiments/levers.py) against plain JAX jit, same run:", "",
                  "| model | lever | train img/s | infer img/s | peak memory |", "|---|---|---|---|---|"]  # fmt: skip
        for name, modes in report["models"].items():
            jit = modes.get("jit", {})
            for mode in variants:
                lever = modes.get(mode, {})
                ratios = [_ratio(lever.get(k), jit.get(k)) for k in ("train_img_s", "infer_b256_img_s", "peak_mem_gb")]
                lines.append(f"| {name} | {mode.removeprefix('jit:')} | " + " | ".join(ratios) + " |")
    if "matmul_peak_error" in report:
        lines += ["", f"Roofline: the matrix-product peak was not measured ({report['matmul_peak_error']})."]
    if "matmul_peak_tflop_s" in report:
        lines += [
            "",
            f"Roofline: measured peak {report['matmul_peak_tflop_s']:.3g} TFLOP/s ({report['matmul_dtype']} matrix "
            f"product, n = {report['matmul_n']}); FLOPs as counted by XLA.",
            "",
            "| model | GFLOPs / image (forward) | GFLOPs / image (train step) | train TFLOP/s | fraction of peak |",
            "|---|---|---|---|---|",
        ]  # fmt: skip
        for name, modes in report["models"].items():
            jit = modes.get("jit", {})
            if "peak_fraction" in jit:
                lines.append(
                    f"| {name} | {jit['flops_forward_per_img'] / 1e9:.2f} | {jit['flops_train_per_img'] / 1e9:.2f} "
                    f"| {jit['train_tflop_s']:.3g} | {jit['peak_fraction']:.1%} |"
                )
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: str) -> None:
    """Training images per second, one group of bars per model, one bar per measured mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    measured = [(mode, label) for mode, label in MODES if any(mode in report["models"][n] for n in names)]
    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(names), 3.6))
    width = 0.8 / max(len(measured), 1)
    for i, (mode, label) in enumerate(measured):
        values = [report["models"][n].get(mode, {}).get("train_img_s") or 0 for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    ax.set_ylabel("training images / s")
    ax.set_title(f"{report['card']}, batch {report['settings']['batch']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(paths: list[str]) -> None:
    if any(path in ("--help", "-h") for path in paths):
        print(__doc__)
        return
    if len(paths) not in (1, 2):
        raise SystemExit("usage: render.py BENCHMARK.json [ACCURACY.json] (see --help)")
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise SystemExit(f"error: {missing[0]} does not exist: name a JSON file that benchmark.py wrote")
    with open(paths[0]) as f:
        report = json.load(f)
    measured = None
    if len(paths) == 2:
        with open(paths[1]) as f:
            measured = json.load(f)
    stem = os.path.splitext(paths[0])[0]
    with open(f"{stem}.md", "w") as f:
        f.write(table(report, measured))
    chart(report, f"{stem}.png")
    print(f"wrote {stem}.md and {stem}.png")


if __name__ == "__main__":
    main(sys.argv[1:])
