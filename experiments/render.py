"""Renders a benchmark JSON as the seed's performance table (markdown) and a bar chart (PNG).

    python experiments/render.py experiments/results/h100.json   # writes h100.md and h100.png beside it

Top-1/Top-5 are the published figures of the converted weights (timm's ImageNet validation), marked
as such: converted weights reproduce timm's logits, so the figures carry over until
experiments/ measures them on ImageNet itself.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

MODES = [("jit", "JAX jit"), ("eager", "JAX eager"), ("timm_eager", "timm eager"), ("timm_compiled", "timm compile")]


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(report: dict[str, Any]) -> str:
    """The seed's columns: accuracy, train s/epoch and inference ms per batch of 32, per mode."""
    from res2net_jax import get_spec

    settings = report["settings"]
    lines = [
        f"{report['card']}, {report['date']}, batch {settings['batch']}, {settings['image_size']} px; "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
        "| model | top-1 | top-5 | " + " | ".join(f"train s/epoch ({label})" for _, label in MODES)
        + " | " + " | ".join(f"infer ms/32 ({label})" for _, label in MODES) + " |",
        "|---" * (3 + 2 * len(MODES)) + "|",
    ]  # fmt: skip
    for name, modes in report["models"].items():
        spec = get_spec(name)
        accuracy = [f"{spec.top1:.2f}*", f"{spec.top5:.2f}*"] if spec.top1 else ["-", "-"]
        epochs = [_number(modes.get(mode, {}).get("s_per_epoch"), 0) for mode, _ in MODES]
        latency = [_number(modes.get(mode, {}).get("infer_b32_ms")) for mode, _ in MODES]
        lines.append(f"| {name} | " + " | ".join(accuracy + epochs + latency) + " |")
    lines += ["", "\\* published ImageNet-1k figures of the converted timm weights, not measured here."]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: str) -> None:
    """Training images per second, one group of bars per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["models"])
    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(names), 3.6))
    width = 0.8 / len(MODES)
    for i, (mode, label) in enumerate(MODES):
        values = [report["models"][n].get(mode, {}).get("train_img_s") or 0 for n in names]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    ax.set_ylabel("training images / s")
    ax.set_title(f"{report['card']}, batch {report['settings']['batch']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(path: str) -> None:
    with open(path) as f:
        report = json.load(f)
    stem = os.path.splitext(path)[0]
    with open(f"{stem}.md", "w") as f:
        f.write(table(report))
    chart(report, f"{stem}.png")
    print(f"wrote {stem}.md and {stem}.png")


if __name__ == "__main__":
    main(sys.argv[1])
