"""main.py end to end on CPU: device-count invariance, exact resume after kill -9, SIGTERM, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from res2net_jax import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
SHORT = "--config.num_train_steps=3"


def _command(workdir: str, dataset: str, *overrides: str) -> list[str]:
    return [
        sys.executable, "main.py", "--config=configs/quickstart.py", f"--workdir={workdir}",
        f"--config.dataset={dataset}", f"--config.num_train_steps={STEPS}", "--config.batch_size=16",
        "--config.eval_batch_size=40", "--config.log_every_steps=2", "--config.checkpoint_every_steps=2",
        "--config.model_overrides.base_width=4", "--config.mixup_alpha=0.2", "--config.cutmix_alpha=1.0",
        "--config.color_jitter=0.4", "--config.random_erasing=0.25", "--config.ema_decay=0.9",
        "--config.label_smoothing=0.1", *overrides,
    ]  # fmt: skip


def _env(devices: int, cache: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if cache or not k.startswith("JAX_COMPILATION_CACHE")}
    return dict(
        env,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        CUDA_VISIBLE_DEVICES="",
        JAX_PLATFORMS="cpu",
    )


def _run(workdir: str, data_dir: str, *overrides: str, devices: int = 8) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(workdir, data_dir, *overrides), cwd=ROOT, env=_env(devices), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip


def _params(workdir: str) -> dict:
    return convert.load_variables(workdir, "res2net50", overrides={"layers": (1, 1, 1, 1), "base_width": 4})["params"]


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One persistent XLA compilation cache for the main.py runs here: runs of the same config skip
    compiling (about 25 s each on 2 cores); the results are the same programs' results."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("xla_cache")))
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # Orbax's many small first-save programs too
        yield


@pytest.fixture(scope="module")
def noise_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """folder:PATH of random-noise images in 4 classes.

    Noise, unlike the digits' flat backgrounds, has no exactly tied maxima, whose gradient goes to one
    element chosen by rounding and so can differ between device counts.
    """
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.RandomState(0)
    for split, count in [("train", 48), ("validation", 20)]:
        for label in range(4):
            (root / split / f"class{label}").mkdir(parents=True)
            for i in range(count):
                pixels = (rng.rand(36, 36, 3) * 255).astype(np.uint8)
                pixels[..., label % 3] //= 2  # a learnable colour cue per class
                Image.fromarray(pixels).save(root / split / f"class{label}" / f"{i}.png")
    return f"folder:{root}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, noise_folder: str) -> str:
    workdir = str(tmp_path_factory.mktemp("reference"))
    done = _run(workdir, noise_folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory, noise_folder: str) -> str:
    """3 steps on 8 devices: the reference for the device-count comparisons.

    Compared after a few steps: float rounding differs with the device count (reduction order) and
    early training amplifies it by about 10x per step, so after 12 steps runs differ at 1e-2.
    """
    workdir = str(tmp_path_factory.mktemp("short"))
    done = _run(workdir, noise_folder, SHORT)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def _assert_same_training(workdir: str, reference: str) -> None:
    for a, b in zip(_leaves(_params(workdir)), _leaves(_params(reference)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    ours, theirs = _metrics(workdir)[-1], _metrics(reference)[-1]
    assert ours["step"] == theirs["step"] == 3
    assert abs(ours["loss"] - theirs["loss"]) < 1e-4


def test_eight_devices_train_like_one(short_run: str, noise_folder: str, tmp_path) -> None:
    done = _run(str(tmp_path), noise_folder, SHORT, devices=1)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_training(str(tmp_path), short_run)


def _leaves(tree: dict) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_output_files_and_last_line(reference_run: str) -> None:
    records = _metrics(reference_run)
    assert {"step", "epoch", "top1", "top5", "loss", "ema_top1"} <= set(records[-1])
    assert os.listdir(os.path.join(reference_run, "tensorboard"))
    assert os.listdir(os.path.join(reference_run, "best"))


def test_kill_9_then_rerun_ends_exactly_like_an_uninterrupted_run(
    reference_run: str, noise_folder: str, tmp_path
) -> None:
    workdir = str(tmp_path)
    process = subprocess.Popen(_command(workdir, noise_folder), cwd=ROOT, env=_env(8), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    checkpoints = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 600
    while time.time() < deadline:  # kill as soon as a checkpoint past step 2 exists
        steps = [int(d) for d in os.listdir(checkpoints) if d.isdigit()] if os.path.isdir(checkpoints) else []
        if any(s >= 4 for s in steps) or process.poll() is not None:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = _run(workdir, noise_folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step" in done.stdout
    assert _metrics(workdir) == _metrics(reference_run)
    for a, b in zip(_leaves(_params(workdir)), _leaves(_params(reference_run)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert done.stdout.strip().splitlines()[-1].startswith("final (step 12): top-1 ")


def test_sigterm_saves_and_exits_cleanly(noise_folder: str, tmp_path) -> None:
    workdir = str(tmp_path)
    process = subprocess.Popen(_command(workdir, noise_folder), cwd=ROOT, env=_env(8), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for line in process.stdout:
        if line.startswith("step 4/"):
            process.send_signal(signal.SIGTERM)
            break
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    assert "SIGTERM: saved step" in output
    saved = int(output.split("SIGTERM: saved step ")[1].split()[0])
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    assert manager.latest_step() == saved
    manager.close()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(noise_folder: str, tmp_path) -> None:
    done = _run(str(tmp_path), noise_folder, "--config.learning_rate=1e30", "--config.warmup_epochs=0", devices=1)
    assert done.returncode != 0
    assert "the loss became nan at step" in done.stderr or "the loss became inf at step" in done.stderr
    assert "last good checkpoint" in done.stderr


def test_bad_inputs_are_clear_errors(noise_folder: str, reference_run: str, tmp_path) -> None:
    done = _run(str(tmp_path), noise_folder, "--config.learning_rte=0.1")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert """unknown config field 'learning_rte' Did you mean "learning_rate" instead""" in done.stderr
    done = _run(str(tmp_path), noise_folder, "--config.model=res2net5O")
    assert done.returncode != 0 and "unknown model 'res2net5O'" in done.stderr
    done = _run(str(tmp_path), noise_folder, "--config.batch_size=12")
    assert done.returncode != 0 and "batch_size=12 does not split evenly over 8 devices" in done.stderr
    done = _run(str(tmp_path), noise_folder, "--config.backend=tpu")
    assert done.returncode != 0 and "no TPU" in done.stderr and "available: cpu" in done.stderr
    before = sorted(os.listdir(os.path.join(reference_run, "checkpoints")))
    done = _run(reference_run, noise_folder, "--config.model=res2net50d")
    assert done.returncode != 0 and "holds a checkpoint of another run" in done.stderr
    assert sorted(os.listdir(os.path.join(reference_run, "checkpoints"))) == before


def test_eval_mode_reproduces_the_final_metrics(reference_run: str, noise_folder: str) -> None:
    done = subprocess.run(
        [*_command(reference_run, noise_folder), "--mode=eval"], cwd=ROOT, env=_env(8), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    final = _metrics(reference_run)[-1]
    assert f"top-1 {final['top1']:.2f}% top-5 {final['top5']:.2f}%" in done.stdout


def test_eval_mode_takes_a_mindspore_checkpoint(reference_run: str, noise_folder: str, tmp_path) -> None:
    overrides = {"layers": (1, 1, 1, 1), "base_width": 4}
    weights = str(tmp_path / "exported.ckpt")
    convert.to_mindspore(convert.load_variables(reference_run, "res2net50", overrides=overrides), "res2net50",
                         weights, overrides)  # fmt: skip
    done = subprocess.run(
        [*_command(str(tmp_path / "eval"), noise_folder, f"--config.eval_weights={weights}"), "--mode=eval"],
        cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    final = _metrics(reference_run)[-1]
    assert f"top-1 {final['top1']:.2f}% top-5 {final['top5']:.2f}%" in done.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_on_loopback_form_one_run(short_run: str, noise_folder: str, tmp_path) -> None:
    """2 processes x 2 devices train like the 8-device run (same global batch).

    Both processes save the latest and the best checkpoint of the same step at an evaluation: this
    also guards against their Orbax barriers colliding (it hung, then aborted, before they had prefixes).
    """
    workdir = str(tmp_path)
    port = _free_port()
    processes = [
        subprocess.Popen(
            [
                *_command(workdir, noise_folder, SHORT),
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={index}",
            ],
            cwd=ROOT,
            env=_env(2, cache=False),  # the two would write the same cache entries at once
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for index in range(2)
    ]
    outputs = [process.communicate(timeout=900)[0] for process in processes]
    for index, (process, output) in enumerate(zip(processes, outputs, strict=True)):
        assert process.returncode == 0, f"process {index}:\n{output[-6000:]}"
    assert "final (step 3)" in outputs[0] and "final" not in outputs[1]  # process 0 reports
    _assert_same_training(workdir, short_run)


def test_fine_tuning_starts_from_given_weights_with_a_new_head(reference_run: str, noise_folder: str, tmp_path) -> None:
    """init_weights + reset_head: a 10-class checkpoint fine-tuned on the 4-class folder."""
    overrides = {"layers": (1, 1, 1, 1), "base_width": 4}
    ten_classes = convert.load_variables(reference_run, "res2net50", overrides=overrides)
    ten_classes["params"]["fc"] = {"kernel": np.ones((2048, 10), np.float32), "bias": np.zeros(10, np.float32)}
    weights = str(tmp_path / "pretrained.safetensors")
    convert.save_state_dict(convert.to_torch(ten_classes, "res2net50", overrides), weights)
    workdir = str(tmp_path / "run")
    done = _run(workdir, noise_folder, f"--config.init_weights={weights}", "--config.num_train_steps=1", devices=1)
    assert done.returncode != 0 and "reset_head=True" in done.stderr  # 10 vs 4 classes is refused...
    done = _run(workdir, noise_folder, f"--config.init_weights={weights}", "--config.reset_head=True",
                "--config.num_train_steps=1", "--config.learning_rate=0", "--config.weight_decay=0",
                "--config.ema_decay=0", devices=1)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]  # ...unless the head is replaced
    tuned = _params(workdir)
    assert tuned["fc"]["kernel"].shape == (2048, 4)
    np.testing.assert_array_equal(
        tuned["layer1_0"]["conv1"]["kernel"], ten_classes["params"]["layer1_0"]["conv1"]["kernel"]
    )
