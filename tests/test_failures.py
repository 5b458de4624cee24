"""Faults and bad input a user can cause: each ends in one clear line, and nothing is lost.

A diverging run never checkpoints NaN; damaged checkpoints and a torn metrics line are skipped;
a second run in a live workdir is refused; every config field is checked before anything is
written; exports appear under their name only when complete.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import orbax.checkpoint as ocp
import pytest
from launch import ROOT, assert_one_line_error, env, metrics, popen, run
from PIL import Image

from res2net_jax import config_check, convert, errors, inference, weight_files
from res2net_jax import workdir as run_dir

OVERRIDES = {"layers": (1, 1, 1, 1), "base_width": 4}
SIX = ("--config.num_train_steps=6", "--config.ema_decay=0")  # checkpoints at steps 2, 4 and 6


pytestmark = pytest.mark.usefixtures("xla_cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, noise_folder: str) -> str:
    """Six steps on one device, checkpoints at 2, 4 and 6: the reference the damaged copies must match."""
    workdir = str(tmp_path_factory.mktemp("finished"))
    done = run(workdir, noise_folder, *SIX, devices=1)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def _all_checkpoints_finite(workdir: str) -> list[int]:
    """The steps in WORKDIR/checkpoints, each asserted to hold only finite values."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    steps = sorted(manager.all_steps())
    for step in steps:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        assert bool(run_dir.all_finite(state)), f"checkpoint {step} holds non-finite values"
    manager.close()
    return steps


# --- 2. The non-finite guard ------------------------------------------------------------------


def test_divergence_keeps_only_finite_checkpoints_and_names_the_one_kept(noise_folder: str, tmp_path) -> None:
    """lr 1e6 with a checkpoint every step: the weights overflow within a few steps."""
    workdir = str(tmp_path)
    done = run(workdir, noise_folder, "--config.learning_rate=1e6", "--config.lr_schedule=constant",
               "--config.warmup_epochs=0", "--config.checkpoint_every_steps=1", "--config.ema_decay=0",
               devices=1)  # fmt: skip
    assert_one_line_error(done, "Rerun with a lower learning_rate")
    assert "final" not in done.stdout
    steps = _all_checkpoints_finite(workdir)
    kept = int(done.stderr.split("the newest checkpoint before it, step ")[1].split(",")[0])
    assert steps and steps[-1] == kept


def test_divergence_without_a_checkpoint_says_none_was_kept(noise_folder: str, tmp_path) -> None:
    done = run(str(tmp_path), noise_folder, "--config.learning_rate=1e30", "--config.warmup_epochs=0",
               "--config.checkpoint_every_steps=100", devices=1)  # fmt: skip
    assert_one_line_error(done, "the loss became nan at step 2; no checkpoint before step 1 was written")
    assert _all_checkpoints_finite(str(tmp_path)) == []


def test_evaluating_non_finite_weights_fails(finished_run: str, noise_folder: str, tmp_path) -> None:
    variables = weight_files.load_variables(finished_run, "res2net50", overrides=OVERRIDES)
    variables["params"]["layer1_0"]["conv1"]["kernel"] = variables["params"]["layer1_0"]["conv1"]["kernel"] * np.inf
    weights = str(tmp_path / "inf.safetensors")
    weight_files.save_state_dict(convert.to_torch(variables, "res2net50", OVERRIDES), weights)
    done = run(str(tmp_path / "eval"), noise_folder, f"--config.eval_weights={weights}", mode="eval", devices=1)
    assert_one_line_error(done, "the evaluation loss of")
    assert "top-1" not in done.stdout


# --- 3. Damaged checkpoints -------------------------------------------------------------------


def _largest_file(directory: str) -> str:
    files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
    return max(files, key=os.path.getsize)


def _write_nan_checkpoint(workdir: str, step: int) -> None:
    """Rewrites checkpoint `step` with one weight NaN, as a flipped exponent bit could make it."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                             meta=ocp.args.JsonRestore()))  # fmt: skip
    manager.close()
    state = restored["state"]
    state["params"]["fc"]["bias"] = np.full_like(np.asarray(state["params"]["fc"]["bias"]), np.nan)
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(restored["meta"])))  # fmt: skip
    manager.wait_until_finished()
    manager.close()


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 3)


DAMAGE = {
    # checkpoint 6 damaged one way and 4 another: the rerun must go back to 2
    "truncated data, no _METADATA": lambda w: (
        _truncate(_largest_file(os.path.join(w, "checkpoints", "6", "state"))),
        os.remove(os.path.join(w, "checkpoints", "4", "state", "_METADATA")),
    ),
    "empty step directory, no state/": lambda w: (
        [
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            for p in (os.path.join(w, "checkpoints", "6", n) for n in os.listdir(os.path.join(w, "checkpoints", "6")))
        ],
        shutil.rmtree(os.path.join(w, "checkpoints", "4", "state")),
    ),  # fmt: skip
    "NaN weights, torn metrics line": lambda w: (
        _write_nan_checkpoint(w, 6),
        open(os.path.join(w, "metrics.jsonl"), "a").write('{"step": 6, "top1": 9'),
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoints_are_skipped_and_the_run_ends_as_if_undamaged(
    damage: str, finished_run: str, noise_folder: str, tmp_path
) -> None:
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    DAMAGE[damage](workdir)
    done = run(workdir, noise_folder, *SIX, devices=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "warning: skipped checkpoint step 6" in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr[-3000:]  # one line per skipped thing
    assert metrics(workdir) == metrics(finished_run)
    assert done.stdout.strip().splitlines()[-1].startswith("final (step 6): top-1 ")
    assert sorted(os.listdir(os.path.join(workdir, "damaged")))  # moved aside, not deleted
    ours = weight_files.load_variables(workdir, "res2net50", overrides=OVERRIDES)["params"]
    theirs = weight_files.load_variables(finished_run, "res2net50", overrides=OVERRIDES)["params"]
    np.testing.assert_array_equal(ours["fc"]["bias"], theirs["fc"]["bias"])


def test_reading_a_workdir_falls_back_and_an_all_damaged_one_is_one_line(
    finished_run: str, noise_folder: str, tmp_path
) -> None:
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    _write_nan_checkpoint(workdir, 6)
    variables = weight_files.load_variables(workdir, "res2net50", overrides=OVERRIDES)  # step 4's
    assert bool(run_dir.all_finite(variables))
    for step in (2, 4):
        os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"))
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    done = run(workdir, noise_folder, *SIX, devices=1)
    assert_one_line_error(done, "no checkpoint in")
    assert "step 6: it holds NaN or infinite values" in done.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing moved or started over
    with pytest.raises(errors.InvalidInputError, match="has no checkpoint that can be restored"):
        weight_files.load_variables(workdir, "res2net50", overrides=OVERRIDES)


def test_a_run_stopped_before_its_first_evaluation_has_no_best_checkpoint_yet(finished_run: str, tmp_path) -> None:
    """WORKDIR/best exists, empty, until the first evaluation: predict says so in one line."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    shutil.rmtree(workdir / "best")
    (workdir / "best").mkdir()
    image = str(tmp_path / "x.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    done = subprocess.run([sys.executable, "-m", "res2net_jax.predict", f"--weights={workdir}/best", image],
                          cwd=ROOT, env=env(1), capture_output=True, text=True)  # fmt: skip
    assert_one_line_error(done, f"{workdir}/best holds no checkpoint yet: train further, or name another one")


# --- 4. Two runs in one workdir ---------------------------------------------------------------


def test_a_live_workdir_is_refused_and_a_dead_holder_does_not_block(noise_folder: str, tmp_path) -> None:
    workdir = str(tmp_path)
    first = popen(workdir, noise_folder, "--config.num_train_steps=1000", devices=1)  # alive until killed
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(workdir, "config.json")) and time.time() < deadline:
        time.sleep(0.2)
    second = run(workdir, noise_folder, devices=1, timeout=120)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert_one_line_error(second, f"is in use by host {os.uname().nodename} PID {first.pid}")
    third = run(workdir, noise_folder, devices=1)  # the killed holder's lock went with it
    assert third.returncode == 0, third.stderr[-3000:]


def test_another_run_in_a_finished_workdir_is_refused(finished_run: str, noise_folder: str, tmp_path) -> None:
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    before = {name: open(os.path.join(workdir, name), "rb").read() for name in ("metrics.jsonl", "config.json")}
    done = run(workdir, noise_folder, *SIX, "--config.seed=1", "--config.model_overrides.base_width=6", devices=1)
    assert_one_line_error(done, "holds another run (model_overrides: ")
    assert "seed: 0 there, 1 now" in done.stderr
    assert {name: open(os.path.join(workdir, name), "rb").read() for name in before} == before


def test_a_run_recorded_with_a_retired_field_resumes_without_it(tmp_path) -> None:
    """A field an earlier release recorded in WORKDIR/config.json (shuffle_buffer, before examples were read
    in a permutation of each epoch) does not make the run another run; a changed field still does."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n')
    (tmp_path / "config.json").write_text(json.dumps({"seed": 0, "shuffle_buffer": 16384, "num_epochs": 2}))
    assert run_dir.check_settings(str(tmp_path), {"seed": 0, "num_epochs": 3}) == ["shuffle_buffer"]
    assert json.loads((tmp_path / "config.json").read_text()) == {"seed": 0, "num_epochs": 3}
    with pytest.raises(errors.InvalidInputError, match="holds another run \\(seed: 0 there, 1 now\\)"):
        run_dir.check_settings(str(tmp_path), {"seed": 1, "num_epochs": 3})


# --- 5. Config values -------------------------------------------------------------------------

BAD_VALUES = [
    ("batch_size", 0), ("batch_size", -64), ("num_epochs", 0), ("num_epochs", -1), ("eval_batch_size", 0),
    ("checkpoint_every_steps", 0), ("log_every_steps", 0), ("keep_checkpoints", 0), ("dtype", "float16"),
    ("optimizer", "adam"), ("lr_schedule", "linear"), ("learning_rate", float("nan")), ("learning_rate", -0.1),
    ("num_train_steps", 0), ("image_size", 16), ("crop_scale", (0.5, 0.1)), ("crop_pct", 0.0),
    ("label_smoothing", 1.0), ("ema_decay", 1.0), ("momentum", 1.5), ("grad_accum_steps", 0),
    ("eval_every_epochs", 0.0), ("backend", "ascend"), ("random_erasing", 2.0), ("color_jitter", -0.1),
    ("freeze", "layer1_("),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_each_bad_config_value_is_named(field: str, value: object) -> None:
    config = importlib.import_module("configs.quickstart").get_config()
    config[field] = value
    with pytest.raises(errors.InvalidInputError, match=f"config.{field}=.* is not allowed: use "):
        config_check.check(config)


@pytest.mark.parametrize(
    ("model", "weights", "message"),
    [
        ("res2net50", "res2net50d", "config.init_weights='res2net50d' are res2net50d's weights but config.model="),
        ("res2net152", "res2net152", "res2net152 has no published weights (neither timm nor MindCV publishes"),
        ("res2net50d", "res2net50_v1b", None),  # MindCV's weights of the same network
        ("res2net50d", "res2net50", "config.init_weights='res2net50' are res2net50_26w_4s's weights but config.model="),
        ("res2net50", "no_such.pth", "config.init_weights='no_such.pth' does not exist (nor a model name with"),
    ],
)
def test_init_weights_names_are_checked(model: str, weights: str, message: str | None) -> None:
    config = importlib.import_module("configs.finetune_cifar10").get_config()
    config.model, config.init_weights = model, weights
    if message is None:
        config_check.check(config)
        return
    with pytest.raises(errors.UserError, match=re.escape(message)):
        config_check.check(config)
    config.init_weights, config.eval_weights, config.reset_head = "", weights, False  # the same rules for validating
    with pytest.raises(errors.UserError, match=re.escape(message.replace("init_weights", "eval_weights"))):
        config_check.check(config, mode="eval")


@pytest.mark.parametrize(("pattern", "what"), [("layer9", "no parameter"), ("", None), (".", "every parameter")])
def test_freeze_must_freeze_some_parameters(pattern: str, what: str | None) -> None:
    config = importlib.import_module("configs.quickstart").get_config()
    config.freeze = pattern
    if what is None:
        config_check.check(config)
        return
    with pytest.raises(errors.InvalidInputError, match=f"config.freeze='{pattern}' matches {what}; paths look like"):
        config_check.check(config)


@pytest.mark.parametrize("override", [{"features_only": True}, {"output_stride": 16}, {"in_chans": 1}])
def test_backbone_overrides_are_refused_for_training(override: dict) -> None:
    config = importlib.import_module("configs.quickstart").get_config()
    config.model_overrides.update(override)
    with pytest.raises(errors.InvalidInputError, match=f"config.model_overrides.{next(iter(override))} is not allowed"):
        config_check.check(config)


def test_every_config_field_is_checked_and_the_shipped_configs_pass() -> None:
    default = importlib.import_module("configs.default").get_config()
    unchecked = set(default) - set(config_check.RULES) - {"model", "model_overrides", "data_dir", "train_split",
                                                           "eval_split", "init_weights", "eval_weights"}  # fmt: skip
    assert not unchecked
    for name in ("default", "quickstart", "finetune_cifar10", "res2net50", "res2net101_v1b"):
        config = importlib.import_module(f"configs.{name}").get_config()
        if config.reset_head:  # fine-tuning configs take the weights file from the command line
            config.init_weights = __file__
        config_check.check(config)


def test_bad_config_is_refused_before_the_workdir_is_made(noise_folder: str, tmp_path) -> None:
    new = str(tmp_path / "new")
    assert_one_line_error(run(new, noise_folder, "--config.batch_size=0", devices=1),
                          "config.batch_size=0 is not allowed: use a whole number >= 1")  # fmt: skip
    imagenet = [sys.executable, "main.py", "--config=configs/res2net50.py", f"--workdir={new}"]
    done = subprocess.run([*imagenet, "--config.model=res2net51"], cwd=ROOT, env=env(1), capture_output=True,
                          text=True)  # fmt: skip
    assert_one_line_error(done, "unknown model 'res2net51'")
    done = subprocess.run([sys.executable, "main.py", "--config=configs/quickstrat.py", f"--workdir={new}"],
                          cwd=ROOT, env=env(1), capture_output=True, text=True)  # fmt: skip
    assert_one_line_error(done, "cannot load --config=configs/quickstrat.py: [Errno 2] No such file")
    assert not os.path.exists(new)


def test_changing_the_optimizer_of_a_workdir_is_named(finished_run: str, noise_folder: str, tmp_path) -> None:
    workdir = str(tmp_path / "run")
    shutil.copytree(finished_run, workdir)
    done = run(workdir, noise_folder, *SIX, "--config.optimizer=adamw", "--config.ema_decay=0.5", devices=1)
    assert_one_line_error(done, "ema_decay: 0.0 there, 0.5 now; optimizer: 'nesterov' there, 'adamw' now")


# --- 6. One line, not a traceback -------------------------------------------------------------


def _module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env(1), capture_output=True, text=True)


def test_cli_errors_are_one_line(tmp_path, tmp_weights: dict[str, str]) -> None:
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    done = _module("res2net_jax.export", "--format=torch", "--model=res2net50", f"--weights={tmp_weights['pth']}",
                   f"--out={out}")  # fmt: skip
    assert_one_line_error(done, f"{out} exists: choose a new output path")
    assert out.read_bytes() == b"keep me"
    done = _module("res2net_jax.export", "--format=onnx", "--model=res2net50", "--weights=/no/such.pth",
                   f"--out={tmp_path / 'x.onnx'}")  # fmt: skip
    assert_one_line_error(done, "weights file not found: /no/such.pth")
    done = _module("res2net_jax.predict", "--model=res2net5O", f"--weights={tmp_weights['pth']}", "a.png")
    assert_one_line_error(done, "unknown model 'res2net5O'")
    done = _module("res2net_jax.predict", "--model=res2net50d", f"--weights={tmp_weights['pth']}", "a.png")
    assert_one_line_error(done, "checkpoint does not fit res2net50d")


# --- 7. predict and export --------------------------------------------------------------------


def _png_header_only(path: str, width: int, height: int) -> None:
    """A PNG whose header claims width x height, with one tiny data chunk: 100 bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                + chunk(b"IEND", b""))  # fmt: skip


def test_images_beyond_the_limits_are_refused_before_decoding(tmp_path) -> None:
    strip = str(tmp_path / "strip.png")
    Image.fromarray(np.zeros((1, 3000), np.uint8)).save(strip)
    with pytest.raises(errors.InvalidInputError, match="strip.png: refused: 3000x1 px"):
        inference.load_image(strip)
    bomb = str(tmp_path / "bomb.png")
    _png_header_only(bomb, 20000, 20000)
    with pytest.raises(errors.InvalidInputError, match="bomb.png: refused: 20000x20000 px"):
        inference.load_image(bomb)


def test_predict_goes_on_after_refused_images(tmp_path, tmp_weights: dict[str, str]) -> None:
    strip, bomb, good = str(tmp_path / "strip.png"), str(tmp_path / "bomb.png"), str(tmp_path / "good.png")
    Image.fromarray(np.zeros((1, 3000), np.uint8)).save(strip)
    _png_header_only(bomb, 20000, 20000)
    Image.fromarray((np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8)).save(good)
    done = _module("res2net_jax.predict", "--model=res2net50_26w_4s", f"--weights={tmp_weights['pth']}",
                   strip, bomb, good)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "strip.png: refused" in done.stderr and "bomb.png: refused" in done.stderr
    assert f"{good}\n" in done.stdout and "2 of 3 images could not be classified" in done.stderr


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path) -> None:
    gray = np.array([[0, 257, 32896, 65535]], np.uint16)  # 0, 1, 128 and 255 in 8 bits
    path = str(tmp_path / "gray16.png")
    Image.fromarray(gray).save(path)
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_array_equal(inference.load_image(path), np.repeat(np.array([[0, 1, 128, 255]])[..., None], 3, -1))


def test_a_failed_export_leaves_nothing_under_its_name(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.numpy

    state_dict = {"w": np.ones((4, 4), np.float32)}
    path = str(tmp_path / "out.safetensors")

    def full_disk(tensors: dict, filename: str) -> None:
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        weight_files.save_state_dict(state_dict, path)
    assert os.listdir(tmp_path) == []  # neither the final name nor a partial file
    monkeypatch.undo()
    weight_files.save_state_dict(state_dict, path)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~_umask())
    with pytest.raises(FileExistsError, match="exists: choose a new output path"):
        weight_files.save_state_dict(state_dict, path)  # the same rule as the command line: never overwrite
    assert json.loads(json.dumps(list(weight_files.load_state_dict(path)))) == ["w"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_freeze_bn_needs_frozen_parameters() -> None:
    config = importlib.import_module("configs.quickstart").get_config()
    config.freeze_bn = True
    with pytest.raises(errors.InvalidInputError, match="config.freeze_bn is set but nothing is frozen"):
        config_check.check(config)
    config.freeze = "^(conv1|bn1|layer1_)"
    config_check.check(config)
