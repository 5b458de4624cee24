"""Does the same recipe train as well here as in timm? The quickstart recipe on both sides, over seeds.

    PYTHONPATH=. python experiments/train_parity.py --seeds=8 --out=experiments/results/train_parity_cpu.json

JAX: `main.py --config=configs/quickstart.py --config.seed=S` as a user runs it. timm: the same network
(timm's res2net50_26w_4s with layers (1, 1, 1, 1) and base_width 14) trained in PyTorch on the same
stratified split of scikit-learn's digits (`res2net_jax.digits.split`) with the same recipe, written
out here: torchvision's RandomResizedCrop to 32 px (scale 0.6-1, ratio 3/4-4/3, bilinear), ImageNet
normalisation, batch 64 with the last partial batch dropped, SGD Nesterov momentum 0.9, weight decay
5e-4 on conv and linear weights only, lr 0.05 with one epoch of linear warmup from 0 then cosine to 0,
per update, 16 epochs; evaluation: resize to 32, center crop. Top-1 on the 355 test images per seed,
then each side's mean and sample standard deviation and Welch's t.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np
import report
from absl import app, flags

from res2net_jax import cli
from res2net_jax import workdir as workdir_files

_SEEDS = flags.DEFINE_integer("seeds", 8, "Seeds 0 .. N-1 on each side.")
_EPOCHS = flags.DEFINE_integer("epochs", 16, "Training epochs (the recipe's 16; fewer only to test the script).")
_SIDES = flags.DEFINE_list("sides", ["timm", "jax"], "Which sides to train: timm, jax.")
_OVERRIDES = flags.DEFINE_list("jax_overrides", [], "Extra --config.FIELD=value for the JAX side (a lever).")
_OUT = flags.DEFINE_string("out", None, "The JSON file to write (never overwritten).", required=True)
PACKAGES = ("jax", "flax", "optax", "tensorflow-cpu", "torch", "torchvision", "timm", "numpy")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, PEAK_LR, WEIGHT_DECAY, SIZE = 64, 0.05, 5e-4, 32


def train_timm(seed: int, epochs: int) -> float:
    """Top-1 (%) of timm's network trained by the recipe above with `seed`."""
    import timm
    import torch
    from PIL import Image
    from torchvision import transforms

    from res2net_jax import digits
    from res2net_jax.registry import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(seed)
    images, labels = digits.load()
    train_ids, test_ids = digits.split(labels)
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    bilinear = transforms.InterpolationMode.BILINEAR
    train_tf = transforms.Compose([transforms.RandomResizedCrop(SIZE, (0.6, 1.0), (3 / 4, 4 / 3), bilinear),
                                   *normalize])  # fmt: skip
    eval_tf = transforms.Compose([transforms.Resize(SIZE, bilinear), transforms.CenterCrop(SIZE), *normalize])
    pil = {i: Image.fromarray(images[i]) for i in range(len(images))}

    model = timm.create_model("res2net50_26w_4s", num_classes=10, layers=[1, 1, 1, 1], base_width=14)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay,
                                 "weight_decay": 0.0}], lr=0.0, momentum=0.9, nesterov=True)  # fmt: skip
    steps_per_epoch = len(train_ids) // BATCH
    total, warmup = epochs * steps_per_epoch, steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    update = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_ids), generator=generator).tolist()
        for b in range(steps_per_epoch):
            ids = [train_ids[i] for i in order[b * BATCH : (b + 1) * BATCH]]
            x = torch.stack([train_tf(pil[i]) for i in ids])
            y = torch.as_tensor(labels[ids])
            if update < warmup:
                lr = PEAK_LR * update / warmup
            else:
                lr = PEAK_LR * 0.5 * (1 + math.cos(math.pi * (update - warmup) / (total - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            update += 1
    model.eval()
    with torch.no_grad():
        x = torch.stack([eval_tf(pil[i]) for i in test_ids])
        predictions = model(x).argmax(-1).numpy()
    return 100.0 * float(np.mean(predictions == labels[test_ids]))


def train_jax(seed: int, epochs: int, data_dir: str, overrides: list[str]) -> float:
    """Top-1 (%) of the quickstart config trained by main.py with `seed`."""
    with tempfile.TemporaryDirectory() as workdir:
        done = subprocess.run(
            [sys.executable, "main.py", "--config=configs/quickstart.py", f"--workdir={workdir}",
             f"--config.data_dir={data_dir}", f"--config.seed={seed}", f"--config.num_epochs={epochs}", *overrides],
            cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        return float(workdir_files.read_metrics(workdir)[-1]["top1"])  # the final evaluation, unrounded


def summary(values: list[float]) -> dict[str, Any]:
    return {"top1": values, "mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1
            else 0.0}  # fmt: skip


def welch_t(a: dict[str, Any], b: dict[str, Any]) -> float:
    se = math.sqrt(a["sd"] ** 2 / len(a["top1"]) + b["sd"] ** 2 / len(b["top1"]))
    return (a["mean"] - b["mean"]) / se if se else 0.0


def main(argv: list[str]) -> None:
    del argv
    report.refuse_existing(_OUT.value)
    results: dict[str, list[float]] = {side: [] for side in _SIDES.value}
    settings = {"seeds": _SEEDS.value, "epochs": _EPOCHS.value, "jax_overrides": _OVERRIDES.value,
                "recipe": "configs/quickstart.py"}  # fmt: skip
    with tempfile.TemporaryDirectory() as data_dir:
        for seed in range(_SEEDS.value):
            for side in results:  # alternated, so an interruption leaves both sides with as many seeds
                if side == "timm":
                    top1 = train_timm(seed, _EPOCHS.value)
                else:
                    top1 = train_jax(seed, _EPOCHS.value, data_dir, _OVERRIDES.value)
                results[side].append(top1)
                print(f"{side} seed {seed}: top-1 {top1:.2f}%", flush=True)
            sides = {side: summary(values) for side, values in results.items()}
            figures: dict[str, Any] = {"sides": sides, "complete": seed + 1 == _SEEDS.value}
            if {"jax", "timm"} <= set(sides) and seed > 0:
                figures["jax_minus_timm"] = sides["jax"]["mean"] - sides["timm"]["mean"]
                figures["welch_t"] = welch_t(sides["jax"], sides["timm"])
            report.write(_OUT.value, PACKAGES, settings, update=seed > 0, **figures)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
