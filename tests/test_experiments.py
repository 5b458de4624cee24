"""The experiments/ scripts on the CPU at tiny sizes, so they cannot rot, with their figures checked
against independent counts: FLOPs against timm's MACs, accuracy against timm's own predictions, the
levers' results against timm's."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    assert_train_passes_equal,
    images_nchw,
    nhwc,
    rel_error,
    shipped_env,
    timm_model,
    timm_pair,
    timm_train_pass_64,
    train_pass_64,
)
from PIL import Image

from res2net_jax import create_model, get_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"compute_dtype", "train_img_s", "s_per_epoch", "infer_b256_img_s", "infer_b32_ms", "infer_b1_ms",
          "compile_s", "peak_mem_gb"}  # fmt: skip
ROOFLINE = {"flops_forward_per_img", "flops_train_per_img", "train_tflop_s", "peak_fraction"}
# The scripts time what a user gets: XLA compiles as in a user's process.
ENV = shipped_env(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
TINY = {"layers": [1, 1, 1, 1]}


def _script(name: str, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"experiments/{name}", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _conv_macs(model: torch.nn.Module, size: int) -> int:
    """Multiply-accumulates of every convolution and linear layer of one image, counted by hooks."""
    total = 0

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        weight = module.weight
        total += output.numel() * (weight[0].numel() if isinstance(module, torch.nn.Conv2d) else weight.shape[1])

    layers = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    hooks = [layer.register_forward_hook(count) for layer in layers]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    return total


def test_benchmark_measures_and_renders_at_a_tiny_size(tmp_path) -> None:
    """JAX jit and timm eager, in bfloat16 as on a GPU. JAX eager and torch.compile are left to real
    runs: on 2 CPU cores their first steps compile for about 5 minutes even at this size (measured),
    more than the suite can give."""
    out = tmp_path / "tiny.json"
    args = ["--models=res2net50_v1b", "--batch=4", "--image_size=32", "--layers=1,1,1,1", "--steps=2",
            "--modes=jit,timm_eager", "--dtype=bfloat16", f"--out={out}"]  # fmt: skip
    log = tmp_path / "log.txt"
    with open(log, "w") as output:
        run = subprocess.Popen([sys.executable, "experiments/benchmark.py", *args], cwd=ROOT, env=ENV,
                               stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
        seen = []  # the file's states while the run goes on: written after each measurement
        while run.poll() is None:
            if out.exists():
                state = json.loads(out.read_text())
                seen.append((state["complete"], sorted(state["models"]["res2net50_v1b"])))
            time.sleep(0.2)
    assert run.returncode == 0, log.read_text()[-3000:]
    assert (False, ["jit"]) in seen, seen
    report = json.loads(out.read_text())
    assert report["complete"] is True
    assert report["card"].startswith("CPU") and report["date"] == datetime.date.today().isoformat()
    assert {"jax", "flax", "torch", "timm"} <= set(report["versions"])
    assert report["matmul_dtype"] == "bfloat16" and report["matmul_peak_tflop_s"] > 0
    modes = report["models"]["res2net50_v1b"]
    assert set(modes) == {"jit", "timm_eager"}
    assert set(modes["jit"]) == FIELDS | ROOFLINE | {"infer_unfolded_b256_img_s"}
    assert set(modes["timm_eager"]) == FIELDS and modes["jit"]["infer_unfolded_b256_img_s"] > 0
    for mode, figures in modes.items():
        assert figures["train_img_s"] > 0 and figures["infer_b1_ms"] > 0, mode
        assert figures["compute_dtype"] == "bfloat16", mode  # as on a GPU, where this is the default
        assert abs(figures["s_per_epoch"] * figures["train_img_s"] - 1_281_167) < 1, mode
    assert modes["jit"]["compile_s"] > 0 and modes["timm_eager"]["compile_s"] is None

    # XLA's count against the convolutions' and the head's MACs counted on timm's network, within 10%:
    # XLA adds BN, ReLU, pooling and adds but leaves out the products with zero padding, which at
    # 32 px is about 4% of them (measured: 0.958). A train step is about three forward passes.
    jit = modes["jit"]
    macs = _conv_macs(timm_model("res2net50d", **TINY), 32)
    assert 0.9 < jit["flops_forward_per_img"] / (2 * macs) < 1.1
    assert 2.5 < jit["flops_train_per_img"] / jit["flops_forward_per_img"] < 3.5
    assert jit["peak_fraction"] == pytest.approx(jit["train_tflop_s"] / report["matmul_peak_tflop_s"])
    assert jit["train_tflop_s"] == pytest.approx(jit["flops_train_per_img"] * jit["train_img_s"] / 1e12)

    again = _script("benchmark.py", *args, timeout=300)
    assert again.returncode != 0 and "exists" in again.stderr

    rendered = _script("render.py", str(out), timeout=300)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    markdown = (tmp_path / "tiny.md").read_text()
    assert markdown.startswith(f"{report['card']}, {report['date']}, batch 4, 32 px, bfloat16; python ")
    row = next(line for line in markdown.splitlines() if line.startswith("| res2net50_v1b (layers 1,1,1,1) |"))
    assert row.startswith("| res2net50_v1b (layers 1,1,1,1) | - | - | ")  # a reduced network: no published figures
    assert f"{modes['jit']['s_per_epoch']:,.0f}" in row
    ratio = modes["jit"]["train_img_s"] / modes["timm_eager"]["train_img_s"]
    assert f"| res2net50_v1b | {ratio:.2f}x | - |" in markdown
    assert f"| {jit['peak_fraction']:.1%} |" in markdown
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_records_a_failed_measurement_and_goes_on(tmp_path) -> None:
    """A measurement over --timeout_s (here every one: 1 s is less than importing JAX) is recorded as an
    error, the run still writes its file, exits 1 naming what failed, and render.py shows it; render.py
    also marks an incomplete file and gives each lever's ratios against plain jit."""
    out = tmp_path / "failed.json"
    done = _script("benchmark.py", "--models=res2net50", "--modes=jit", "--timeout_s=1", f"--out={out}",
                   timeout=300)  # fmt: skip
    assert done.returncode == 1 and "failed (recorded as errors" in done.stderr and "res2net50 jit" in done.stderr
    report = json.loads(out.read_text())
    assert report["complete"] is True
    assert report["models"]["res2net50"]["jit"] == {"error": "stopped after --timeout_s=1 s"}
    assert report["matmul_peak_error"] == "stopped after --timeout_s=1 s"
    rendered = _script("render.py", str(out), timeout=300)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    markdown = (tmp_path / "failed.md").read_text()
    assert "Failed ('-' in its columns): res2net50 jit: stopped after --timeout_s=1 s" in markdown
    assert "the matrix-product peak was not measured" in markdown and "Incomplete" not in markdown
    out.write_text(json.dumps(dict(report, complete=False)))  # as a run cut short leaves it
    assert _script("render.py", str(out), timeout=300).returncode == 0
    assert "**Incomplete: the run was cut short" in (tmp_path / "failed.md").read_text()
    jit = {"train_img_s": 10, "infer_b256_img_s": 20, "peak_mem_gb": 2}
    lever = {"train_img_s": 12, "infer_b256_img_s": 20, "peak_mem_gb": 1.5}
    out.write_text(json.dumps(dict(report, models={"res2net50": {"jit": jit, "jit:bn_one_pass": lever}})))
    assert _script("render.py", str(out), timeout=300).returncode == 0
    assert "| res2net50 | bn_one_pass | 1.20x | 1.00x | 0.75x |" in (tmp_path / "failed.md").read_text()

    unknown = _script("benchmark.py", "--models=res2net5O", f"--out={tmp_path / 'u.json'}", timeout=300)
    assert unknown.returncode == 1 and "unknown model 'res2net5O'" in unknown.stderr
    unknown = _script("benchmark.py", "--modes=jit:fast", f"--out={tmp_path / 'u.json'}", timeout=300)
    assert unknown.returncode == 1 and "unknown mode 'jit:fast'" in unknown.stderr and "bn_one_pass" in unknown.stderr
    assert not (tmp_path / "u.json").exists()


@pytest.mark.parametrize("lever", ["pad_branches", "bn_one_pass"])
def test_levers_change_the_program_not_the_results(lever: str) -> None:
    """Each lever of levers.py, in train mode: in float64, logits and BN running statistics equal timm's;
    in float32, logits as close to timm's float64 as timm's own float32 are; and the traced program
    differs from the plain model's (the lever is applied)."""
    spec = importlib.util.spec_from_file_location("levers", os.path.join(ROOT, "experiments", "levers.py"))
    levers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(levers)
    name = "res2net50_26w_4s"  # branches of 26, 52, 104 and 208 channels
    reference_32, variables = timm_pair(name, **TINY)
    x = images_nchw(2, 64, 64)
    expected = timm_train_pass_64(reference_32, x)
    with torch.no_grad():
        timm_32 = reference_32.train()(torch.from_numpy(x)).numpy()

    def new_train_fn(dtype: jnp.dtype) -> Callable:  # a new function each time: JAX caches traces by function
        model = create_model(name, dtype=dtype, **TINY)
        return lambda v, images: model.apply(v, images, train=True, mutable=["batch_stats"])

    images = nhwc(x)
    with jax.enable_x64(True):
        plain = str(jax.make_jaxpr(new_train_fn(jnp.float64))(variables, images.astype(np.float64)))
        with levers.applied(lever):
            assert str(jax.make_jaxpr(new_train_fn(jnp.float64))(variables, images.astype(np.float64))) != plain
    model_64 = create_model(name, dtype=jnp.float64, **TINY)
    assert_train_passes_equal(train_pass_64(model_64, variables, x, levers.LEVERS[lever]), expected)
    with levers.applied(lever), jax.default_matmul_precision("highest"):
        logits_32, _ = jax.jit(new_train_fn(jnp.float32))(variables, images)
    assert rel_error(logits_32, expected[0]) <= 2 * rel_error(timm_32, expected[0]) + 1e-6


@pytest.mark.parametrize("name", ["res2net50", "res2net101"])
def test_flop_count_matches_the_published_macs(name: str) -> None:
    """The count benchmark.py reports (XLA's, before optimisation), at 224 px, against timm's published
    GMACs for the full networks (4.28 and 8.10): within 3%."""
    model = create_model(name)
    image = jnp.zeros((1, 224, 224, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), image)
    flops = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, image).cost_analysis()["flops"]
    published = {"res2net50": 4.28e9, "res2net101": 8.10e9}[name]
    assert flops / 2 == pytest.approx(published, rel=0.03)


def test_input_pipeline_speed_on_synthetic_jpegs(tmp_path) -> None:
    """Both sides on the same JPEGs: what each hands over (this project uint8 and int32 label, epoch and
    index; timm float32 and an int64 label) and a rate per core."""
    out = tmp_path / "pipeline.json"
    done = _script("input_pipeline_speed.py", "--images=40", "--batch=8", "--batches=3", "--image_size=64",
                   "--rounds=1", f"--out={out}", timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["card"].startswith("CPU") and "timm" in report["versions"]
    sides = report["sides"]
    assert sides["jax"]["train"]["bytes_per_image"] == 64 * 64 * 3 + 3 * 4
    assert sides["jax"]["eval"]["bytes_per_image"] == 64 * 64 * 3 + 4 + 4  # label and mask
    assert sides["timm"]["train"]["bytes_per_image"] == 64 * 64 * 3 * 4 + 8
    for side in sides.values():
        assert side["train"]["img_s_per_core"] > 0 and side["eval"]["img_s_per_core"] > 0
    assert report["jax_over_timm"]["train"] > 0 and report["stages_ms_per_image"]["host_train_total"] > 0
    reads = report["reads"]  # host 0 of N reads 40 // 8 batches x 8 / N records; before, all 40 at any N
    assert reads["whole_split"]["bytes_per_epoch_per_host"] == pytest.approx(40 * reads["record_bytes"])
    for hosts in (1, 2, 4, 8):
        assert reads[f"by_index_{hosts}_hosts"]["bytes_per_epoch_per_host"] == pytest.approx(
            40 // hosts * reads["record_bytes"]
        )
        assert reads[f"by_index_{hosts}_hosts"]["records_s"] > 0
    too_few = _script("input_pipeline_speed.py", "--images=10", "--batch=8", f"--out={tmp_path / 'b.json'}")
    assert too_few.returncode != 0 and "fewer than the 64 images" in too_few.stderr
    assert not (tmp_path / "b.json").exists()


def test_imagenet_accuracy_script_agrees_with_timm(tmp_path) -> None:
    """A folder dataset labelled from timm's own ranking of each image: a third of the labels are
    timm's top-1 class, a third its third-ranked, a third its last. The script (our converted weights,
    our pipeline) must report exactly 1/3 top-1 and 2/3 top-5."""
    size, classes, count = 32, 10, 24
    reference = timm_model("res2net50d", num_classes=classes, **TINY)
    weights = tmp_path / "tiny_res2net50d.pth"
    torch.save(reference.state_dict(), weights)

    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (count, size, size, 3), dtype=np.uint8)
    spec = get_spec("res2net50_v1b")
    normalised = (images / 255.0 - np.array(spec.mean)) / np.array(spec.std)
    with torch.no_grad():
        logits = reference(torch.tensor(normalised.transpose(0, 3, 1, 2), dtype=torch.float32)).numpy()
    ranking = np.argsort(-logits, axis=1)
    gaps = -np.diff(np.sort(logits, axis=1)[:, ::-1], axis=1)[:, :5]
    assert gaps.min() > 1e-3, "near-tied logits would make the expected figures fragile: change the seed"
    for index, image in enumerate(images):
        label = ranking[index, [0, 2, classes - 1][index % 3]]
        directory = tmp_path / "data" / "validation" / f"c{label}"
        directory.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(directory / f"{index}.png")
    for label in range(classes):  # a train split naming every class, as the folder dataset requires
        directory = tmp_path / "data" / "train" / f"c{label}"
        directory.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[0]).save(directory / "0.png")

    out = tmp_path / "accuracy.json"
    args = [f"--weights=res2net50_v1b={weights}", f"--dataset=folder:{tmp_path / 'data'}", f"--image_size={size}",
            "--crop_pct=1.0", "--batch=8", "--layers=1,1,1,1", "--backend=cpu", f"--out={out}"]  # fmt: skip
    done = _script("imagenet_accuracy.py", *args, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    figures = report["models"]["res2net50_v1b"]
    assert figures["top1"] == pytest.approx(100 / 3) and figures["top5"] == pytest.approx(200 / 3)
    assert report["settings"]["dataset"].startswith("folder:") and report["card"].startswith("CPU")

    # render.py shows measured figures unmarked when given the accuracy file.
    jit = {"s_per_epoch": 100.0, "infer_b32_ms": 5.0, "train_img_s": 9.0}
    speed = {"card": "CPU", "date": report["date"], "versions": {}, "settings": {"batch": 4, "image_size": 32},
             "models": {"res2net50_v1b": {"jit": jit}}}  # fmt: skip
    (tmp_path / "speed.json").write_text(json.dumps(speed))
    rendered = _script("render.py", str(tmp_path / "speed.json"), str(out), timeout=300)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    assert "| res2net50_v1b | 33.33 | 66.67 | 100 | - |" in (tmp_path / "speed.md").read_text()


def test_conv_probe_times_both_frameworks(tmp_path) -> None:
    out = tmp_path / "probe.json"
    done = _script("conv_probe.py", "--batch=2", "--shapes=8x16", "--repeats=1", f"--out={out}", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())["shapes"]["8x16"]
    assert set(figures) == {f"{framework}_{what}_ms" for framework in ("jax", "torch")
                            for what in ("forward", "forward_backward")}  # fmt: skip
    assert all(value > 0 for value in figures.values())


def test_train_parity_trains_both_sides(tmp_path) -> None:
    """Two epochs, one seed a side (the recipe's 16 epochs x 8 seeds take over an hour on 2 cores)."""
    out = str(tmp_path / "parity.json")
    done = _script("train_parity.py", "--seeds=1", "--epochs=2", f"--out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        result = json.load(f)
    assert result["complete"] and result["settings"]["epochs"] == 2
    for side in ("jax", "timm"):
        (top1,) = result["sides"][side]["top1"]
        correct = top1 * 355 / 100  # both sides evaluate the same 355 held-out digits
        assert 0 <= top1 <= 100 and abs(correct - round(correct)) < 1e-6, result


def test_remat_memory_compiles_both_steps_and_remat_keeps_less(tmp_path) -> None:
    """At a tiny size (two blocks in the first stage, whose activations remat recomputes instead of keeping),
    the compiled step with remat plans fewer temporaries than the plain one, for the same arguments."""
    out = tmp_path / "remat.json"
    done = _script("remat_memory.py", "--models=res2net50", "--layers=2,1,1,1", "--image_size=64", "--batch=8",
                   f"--out={out}")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["date"] == datetime.date.today().isoformat() and result["card"] and result["versions"]["jax"]
    measured = result["models"]["res2net50"]
    assert measured["remat"]["temp_mib"] < measured["plain"]["temp_mib"]
    assert measured["remat"]["argument_mib"] == measured["plain"]["argument_mib"]


def test_deploy_speed_times_every_side_and_records_the_graphs(tmp_path) -> None:
    out = tmp_path / "deploy.json"
    args = ["--image_size=64", "--layers=1,1,1,1", "--repeats=1", "--rounds=1", "--pad_branches=8", f"--out={out}"]
    done = _script("deploy_speed.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]  # the widened graph computed the same logits, or it stops
    result = json.loads(out.read_text())
    assert result["card"].startswith("CPU") and result["date"] == datetime.date.today().isoformat()
    assert result["versions"]["onnxruntime"] != "not installed"
    assert set(result["sides"]) == {"onnx", "timm_onnx", "jit_folded", "jit_unfolded", "jit_xla_defaults",
                                    "timm_eager", "onnx_padded"}  # fmt: skip
    assert {"onnx_padded_vs_onnx_b1", "onnx_padded_vs_onnx_b8", "jit_folded_vs_xla_defaults_b8"} <= set(
        result["ratios"]
    )
    assert all(figures["b8_img_s"] > 0 and figures["b1_ms"] > 0 for figures in result["sides"].values())
    assert all(ratio > 0 for ratio in result["ratios"].values())
    ours, timms = result["graphs"]["onnx"]["ops"], result["graphs"]["timm_onnx"]["ops"]
    # the stem's 3, each of the 4 blocks' conv1, 3 branch convolutions and conv3, and each stage's shortcut
    assert "BatchNormalization" not in ours and ours["Conv"] == timms["Conv"] == 3 + 4 * 5 + 4
    assert result["graphs"]["onnx_padded"]["ops"] == ours  # widened, not rewired
    assert _script("deploy_speed.py", "--image_size=64", f"--out={out}").returncode == 1  # never overwritten


PROFILED = """
import subprocess, sys

import jax


def test_compiles_here():
    jax.jit(lambda x: x * 2)(1.0)


def test_starts_a_process_that_compiles():
    subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0)"], check=True)


def test_compiles_nothing():
    pass
"""


def test_suite_profile_counts_each_tests_compiling_and_processes(tmp_path) -> None:
    """A pytest run of three tests: one compiles in pytest's process, one in a process it starts, one not
    at all; each process's CPU seconds are counted once, and compiling is a part of them."""
    (tmp_path / "test_profiled.py").write_text(PROFILED)
    out = tmp_path / "profile.json"
    done = _script("suite_profile.py", f"--out={out}", "--", "-q", "-p", "no:cacheprovider",
                   str(tmp_path / "test_profiled.py"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["returncode"] == 0 and result["date"] == datetime.date.today().isoformat()
    tests = {name.split("::")[-1]: figures for name, figures in result["tests"].items()}
    here, started = tests["test_compiles_here"], tests["test_starts_a_process_that_compiles"]
    assert here["xla_s"] > 0 and "processes" not in here
    assert started["xla_s"] > 0 and started["processes"] == 1 and started["process_cpu_s"] > started["xla_s"]
    assert "test_compiles_nothing" not in tests
    totals = result["totals"]
    assert totals["processes"] == 2  # pytest and the started one
    assert 0 < totals["compiling_s"] < totals["cpu_s"] <= totals["run_cpu_s"] + 0.05  # the OS counts in ticks
    assert totals["xla_s"] == pytest.approx(here["xla_s"] + started["xla_s"])
