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

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import SIX_STEPS
from launch import (
    MODEL,
    OVERRIDES,
    ROOT,
    assert_one_line_error,
    cli_calls,
    config_of,
    env,
    metrics,
    popen,
    run_here,
    run_variables,
)
from PIL import Image

from res2net_jax import config_check, convert, errors, inference, train, weight_files
from res2net_jax import workdir as run_dir

pytestmark = pytest.mark.usefixtures("xla_cache")


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


def _logged_losses(stdout: str) -> list[float]:
    return [float(line.split(" loss ")[1].split()[0]) for line in stdout.splitlines() if line.startswith("step ")]


def test_following_the_divergence_advice_ends_in_a_run_that_trains(noise_folder: str, tmp_path) -> None:
    """A healthy run resumed at lr 1e6, then at 1e3 (each a checkpoint every step): the first exploded loss
    (finite, far above chance level) stops each one, and the checkpoint kept is the last whose loss was
    healthy, not the finite but exploded one after it. The rerun the message advises finishes with a
    finite, falling loss and a model that predicts (the exploded weights gave loss 1e9 and 11% top-1)."""
    workdir = str(tmp_path)
    common = ("--config.lr_schedule=constant", "--config.warmup_epochs=0", "--config.checkpoint_every_steps=1",
              "--config.ema_decay=0", "--config.mixup_alpha=0", "--config.cutmix_alpha=0")  # fmt: skip
    assert run_here(workdir, noise_folder, *common, "--config.num_train_steps=6").returncode == 0
    for rate, shown in (("1e6", "1e+06"), ("1e3", "1000")):
        done = run_here(workdir, noise_folder, *common, f"--config.learning_rate={rate}", "--config.num_train_steps=24")
        assert_one_line_error(done, "the loss exploded to ")
        assert f"at step 8; the newest checkpoint before it, step 6, is kept in {workdir}" in done.stderr
        assert f"Rerun with a learning_rate lower than {shown}: it resumes from step 6" in done.stderr
        assert "grad_clip_norm set (e.g. 1.0)" in done.stderr  # not set: the other way out
        assert _all_checkpoints_finite(workdir)[-1] == 6
    done = run_here(workdir, noise_folder, *common, mode="eval")  # the kept checkpoint, step 6
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, "eval.jsonl")) as f:
        kept = json.loads(f.readlines()[-1])
    done = run_here(workdir, noise_folder, *common, "--config.learning_rate=0.01", "--config.num_train_steps=24")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step 6" in done.stdout
    losses = _logged_losses(done.stdout)
    assert len(losses) == 9 and all(np.isfinite(losses)), losses
    final = metrics(workdir)[-1]
    assert final["step"] == 24 and final["loss"] < min(kept["loss"], np.log(4)) and final["top1"] > 50, (kept, final)


def test_divergence_without_a_checkpoint_says_to_start_a_new_workdir(noise_folder: str, tmp_path) -> None:
    done = run_here(str(tmp_path), noise_folder, "--config.learning_rate=1e30", "--config.warmup_epochs=0",
                    "--config.checkpoint_every_steps=100", "--config.grad_clip_norm=1.0")  # fmt: skip
    assert_one_line_error(done, f"the loss became nan at step 2; no checkpoint from before step 1 was written, so "
                                f"{tmp_path} holds nothing to resume: start a new --workdir with a learning_rate "
                                "lower than 1e+30")  # fmt: skip
    assert "grad_clip_norm" not in done.stderr  # already set
    assert _all_checkpoints_finite(str(tmp_path)) == []


def test_evaluating_non_finite_weights_fails(six_step_run: str, noise_folder: str, tmp_path) -> None:
    variables = run_variables(six_step_run)
    variables["params"]["layer1_0"]["conv1"]["kernel"] = variables["params"]["layer1_0"]["conv1"]["kernel"] * np.inf
    weights = str(tmp_path / "inf.safetensors")
    weight_files.save_state_dict(convert.to_torch(variables, MODEL, OVERRIDES), weights)
    done = run_here(str(tmp_path / "eval"), noise_folder, f"--config.eval_weights={weights}", mode="eval")
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
    damage: str, six_step_run: str, noise_folder: str, tmp_path
) -> None:
    workdir = str(tmp_path / "run")
    shutil.copytree(six_step_run, workdir)
    DAMAGE[damage](workdir)
    done = run_here(workdir, noise_folder, *SIX_STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "warning: skipped checkpoint step 6" in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr[-3000:]  # one line per skipped thing
    assert metrics(workdir) == metrics(six_step_run)
    assert done.stdout.strip().splitlines()[-1].startswith("final (step 6): top-1 ")
    assert sorted(os.listdir(os.path.join(workdir, "damaged")))  # moved aside, not deleted
    ours, theirs = run_variables(workdir)["params"], run_variables(six_step_run)["params"]
    np.testing.assert_array_equal(ours["fc"]["bias"], theirs["fc"]["bias"])


def test_reading_a_workdir_falls_back_and_an_all_damaged_one_is_one_line(
    six_step_run: str, noise_folder: str, tmp_path
) -> None:
    workdir = str(tmp_path / "run")
    shutil.copytree(six_step_run, workdir)
    _write_nan_checkpoint(workdir, 6)
    variables = run_variables(workdir)  # step 4's
    assert bool(run_dir.all_finite(variables))
    for step in (2, 4):
        os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"))
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    done = run_here(workdir, noise_folder, *SIX_STEPS)
    assert_one_line_error(done, "no checkpoint in")
    assert "step 6: it holds NaN or infinite values" in done.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing moved or started over
    with pytest.raises(errors.InvalidInputError, match="has no checkpoint that can be restored"):
        run_variables(workdir)


def test_a_run_stopped_before_its_first_evaluation_has_no_best_checkpoint_yet(six_step_run: str, tmp_path) -> None:
    """WORKDIR/best exists, empty, until the first evaluation: predict says so in one line."""
    workdir = tmp_path / "run"
    shutil.copytree(six_step_run, workdir)
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
    second = run_here(workdir, noise_folder)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert_one_line_error(second, f"is in use by host {os.uname().nodename} PID {first.pid}")
    third = run_here(workdir, noise_folder, *SIX_STEPS)  # the killed holder's lock went with it
    assert third.returncode == 0, third.stderr[-3000:]


def test_another_run_in_a_finished_workdir_is_refused(six_step_run: str, noise_folder: str, tmp_path) -> None:
    workdir = str(tmp_path / "run")
    shutil.copytree(six_step_run, workdir)
    before = {name: open(os.path.join(workdir, name), "rb").read() for name in ("metrics.jsonl", "config.json")}
    done = run_here(workdir, noise_folder, *SIX_STEPS, "--config.seed=1", "--config.model_overrides.base_width=6")
    assert_one_line_error(done, "holds another run (model_overrides: ")
    assert "seed: 0 there, 1 now" in done.stderr
    assert {name: open(os.path.join(workdir, name), "rb").read() for name in before} == before


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
    assert_one_line_error(run_here(new, noise_folder, "--config.batch_size=0"),
                          "config.batch_size=0 is not allowed: use a whole number >= 1")  # fmt: skip
    imagenet = config_of(["main.py", "--config=configs/res2net50.py", f"--workdir={new}", "--config.model=res2net51"])
    with pytest.raises(errors.InvalidInputError, match="unknown model 'res2net51'"):
        train.train_and_evaluate(imagenet, new)
    done = subprocess.run([sys.executable, "main.py", "--config=configs/quickstrat.py", f"--workdir={new}"],
                          cwd=ROOT, env=env(1), capture_output=True, text=True)  # fmt: skip
    assert_one_line_error(done, "cannot load --config=configs/quickstrat.py: [Errno 2] No such file")
    assert not os.path.exists(new)


def test_changing_the_optimizer_of_a_workdir_is_named(six_step_run: str, noise_folder: str, tmp_path) -> None:
    workdir = str(tmp_path / "run")
    shutil.copytree(six_step_run, workdir)
    done = run_here(workdir, noise_folder, *SIX_STEPS, "--config.optimizer=adamw", "--config.ema_decay=0.5")
    assert_one_line_error(done, "ema_decay: 0.9 there, 0.5 now; optimizer: 'nesterov' there, 'adamw' now")


# --- 6. One line, not a traceback -------------------------------------------------------------


def _module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env(1), capture_output=True, text=True)


def test_cli_errors_are_one_line(tmp_path, tmp_weights: dict[str, str]) -> None:
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    exists, missing = cli_calls(
        "res2net_jax.export",
        ["--format=torch", "--model=res2net50", f"--weights={tmp_weights['pth']}", f"--out={out}"],
        ["--format=onnx", "--model=res2net50", "--weights=/no/such.pth", f"--out={tmp_path / 'x.onnx'}"],
    )
    assert_one_line_error(exists, f"{out} exists: choose a new output path")
    assert out.read_bytes() == b"keep me"
    assert_one_line_error(missing, "weights file not found: /no/such.pth")
    calls = [[f"--model={name}", f"--weights={tmp_weights['pth']}", "a.png"] for name in ("res2net5O", "res2net50d")]
    unknown, misfit = cli_calls("res2net_jax.predict", *calls)
    assert_one_line_error(unknown, "unknown model 'res2net5O'")
    assert_one_line_error(misfit, "checkpoint does not fit res2net50d")


def test_predict_and_export_flags_are_checked_before_any_work(tmp_path, tmp_weights: dict[str, str]) -> None:
    weights = f"--weights={tmp_weights['pth']}"
    counts = ("--top_k=0", "--top_k=-1", "--batch_size=0")
    calls = [["--model=res2net50", weights, flag, "a.png"] for flag in counts]
    for flag, done in zip(counts, cli_calls("res2net_jax.predict", *calls), strict=True):
        assert_one_line_error(done, f"{flag} is not allowed: use a whole number >= 1")
    (tmp_path / "a_file").write_text("")  # in the way of the output's directory (root writes anywhere else)
    out = tmp_path / "a_file" / "sub" / "x.safetensors"
    sizes = ("0", "8", "-1")
    calls = [["--format=onnx", "--model=res2net50", weights, f"--image_size={size}", f"--out={tmp_path / 'x.onnx'}"]
             for size in sizes] + [["--format=torch", "--model=res2net50", weights, f"--out={out}"]]  # fmt: skip
    *too_small, unwritable = cli_calls("res2net_jax.export", *calls)
    for size, done in zip(sizes, too_small, strict=True):
        assert_one_line_error(done, f"--image_size={size} is not allowed: the models take 32 px or more")
    assert_one_line_error(unwritable, f"cannot write {out}: {tmp_path / 'a_file'} is not a writable directory")
    assert os.listdir(tmp_path) == ["a_file"]


CLI_FAULT = """
import errno
from res2net_jax import cli

def main(argv):
    if argv[1:] == ["full"]:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.onnx")
    for _ in range(200000):
        print("a row of output")

cli.run(main)
"""


def test_a_full_disk_and_a_closed_pipe_end_the_commands_in_one_line_or_quietly() -> None:
    done = subprocess.run([sys.executable, "-c", CLI_FAULT, "full"], cwd=ROOT, capture_output=True, text=True)
    assert_one_line_error(done, "error: no space left on the device writing /data/out.onnx: free some space")
    reader = subprocess.Popen([sys.executable, "-c", CLI_FAULT], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert reader.stdout.readline() == "a row of output\n"
    reader.stdout.close()  # as `| head -1` does
    assert reader.wait(timeout=120) == 141 and reader.stderr.read() == ""


def test_untrusted_class_names_cannot_act_on_the_terminal(tmp_path) -> None:
    """A config.json's label names with an escape sequence (a terminal title change), a newline (a forged
    result row) and a carriage return are written as escapes, in every format."""
    from res2net_jax import create_model, save_pretrained

    model = create_model(MODEL, num_classes=3, **OVERRIDES)
    variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    evil = ["\x1b]0;owned\x07cat", "dog\n  99.99%     0  forged", "bird\r"]
    directory = tmp_path / "evil"
    save_pretrained(directory, MODEL, variables, class_names=evil, overrides=OVERRIDES)
    image = tmp_path / "a.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8)).save(image)
    outputs, kinds = {}, ("text", "csv", "json")
    calls = [[f"--weights={directory}", f"--format={kind}", str(image)] for kind in kinds]
    for kind, done in zip(kinds, cli_calls("res2net_jax.predict", *calls), strict=True):
        assert done.returncode == 0, done.stderr[-3000:]
        assert not any(c in done.stdout for c in "\x1b\x07\r"), done.stdout
        outputs[kind] = done.stdout
    assert len(outputs["text"].splitlines()) == 4  # the path and three classes: no forged row
    assert "\\x1b]0;owned\\x07cat" in outputs["text"] and "dog\\n  99.99%" in outputs["text"]
    assert len(outputs["csv"].splitlines()) == 4
    shown = {r"\x1b]0;owned\x07cat", r"dog\n  99.99%     0  forged", r"bird\r"}  # the escapes, as text
    assert {row["label"] for row in json.loads(outputs["json"])[0]["top"]} == shown


def test_a_bad_image_in_a_folder_dataset_is_named_before_training(tmp_path) -> None:
    """A text file named .jpg among the training images: one line naming it, no workdir, no hang."""
    root = tmp_path / "images"
    for split in ("train", "validation"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(root / split / label / "0.png")
    (root / "train" / "b" / "readme.jpg").write_text("not an image")
    workdir = tmp_path / "run"
    done = run_here(str(workdir), f"folder:{root}")
    assert_one_line_error(done, f"1 file(s) in {root} are not whole JPEG or PNG images: {root}/train/b/readme.jpg")
    assert not workdir.exists()


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


HELP = [  # (command, the start of its docstring)
    (["main.py"], "Trains or validates a Res2Net."),
    (["-m", "res2net_jax.predict"], "Top-k classes of image files."),
    (["-m", "res2net_jax.export"], "Writes a model's weights in another format."),
    (["experiments/benchmark.py"], "Training and inference speed of res2net_jax (jit and eager) and timm"),
    (["experiments/render.py"], "Renders a benchmark JSON as the seed's performance table"),
    (["experiments/levers.py"], "Candidate optimisations of res2net_jax's train step"),
    (["notebooks/set_repository.py"], "Points the notebooks and the README at the repository"),
]


@pytest.mark.parametrize(
    ("command", "first_line"), HELP, ids=lambda value: " ".join(value)[-30:] if isinstance(value, list) else ""
)
def test_every_command_answers_help(command: list[str], first_line: str) -> None:
    """--help prints what the command does (its docstring and flags) and exits 0."""
    done = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=dict(env(1), PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert done.stdout.startswith(first_line), done.stdout[:500]


def test_a_missing_or_bad_flag_is_one_line() -> None:
    done = subprocess.run([sys.executable, "main.py", "--config=configs/quickstart.py"], cwd=ROOT, env=env(1),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert_one_line_error(done, "error: flag --workdir=None: Flag --workdir must have a value other than None.")
    done = _module("res2net_jax.predict", "--top_k=abc", "--weights=x", "a.png")
    assert_one_line_error(done, "error: flag --top_k=abc: invalid literal for int()")


def test_a_checkpoint_the_disk_has_no_room_for_is_refused_before_writing(tmp_path, monkeypatch) -> None:
    """A disk that fills while TensorStore writes makes its writes still in flight print tracebacks of
    their own (0 to 200 'Event loop is closed' ones per run on a 3 MB tmpfs, after the one line), which
    no Python hook catches; a save the disk has no room for is refused before anything is written."""
    import flax

    @flax.struct.dataclass
    class State:
        step: np.ndarray
        kernel: np.ndarray

    checkpoints = run_dir.Checkpoints(str(tmp_path), keep=3)
    kernel = np.zeros((512, 1024), np.float32)  # 2 MiB
    checkpoints.save(State(np.int32(4), kernel), meta={})
    checkpoints.wait()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=2 << 20))
    with pytest.raises(run_dir.DiskFullError) as raised:
        checkpoints.save(State(np.int32(6), kernel), meta={})
    assert str(raised.value).startswith(f"no room on the disk holding {tmp_path} (2.0 MB free, a checkpoint needs "
                                        "about 2.0 MB): a checkpoint could not be written (step 4, the newest "
                                        "complete checkpoint, is kept)")  # fmt: skip
    checkpoints.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_step_kept(tmp_path) -> None:
    """Orbax reports a full disk as a ValueError from its writer threads (RESOURCE_EXHAUSTED ... No space
    left on device), logging each failed write with its traceback (870 lines once). Checkpoints turns it
    into one line naming the disk and the newest complete checkpoint, hides the writers' log records, and
    does not wait on writers that cannot finish."""
    import logging

    checkpoints = run_dir.Checkpoints(str(tmp_path), keep=3)
    os.makedirs(tmp_path / "checkpoints" / "4")  # a complete checkpoint; the failed one is a tmp directory
    os.makedirs(tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp")
    full = ValueError('RESOURCE_EXHAUSTED: Error writing "params.fc.kernel/0": Failed writing: No space left on '
                      "device [os_error_code='28']")  # fmt: skip

    class FullDisk:
        closed = False

        def wait_until_finished(self) -> None:
            raise full

        def close(self) -> None:
            FullDisk.closed = True

    checkpoints.close()  # the real managers; their writers are replaced by ones on a full disk
    checkpoints.latest, checkpoints.best = FullDisk(), FullDisk()
    with pytest.raises(run_dir.DiskFullError) as raised:
        checkpoints.wait()
    assert str(raised.value) == (f"no room on the disk holding {tmp_path} (no space left on device): a checkpoint "
                                 "could not be written (step 4, the newest complete checkpoint, is kept); free some "
                                 "space there and rerun the same command, which resumes from the newest complete "
                                 "checkpoint")  # fmt: skip
    checkpoints.close()
    assert not FullDisk.closed
    record = logging.LogRecord("absl", logging.ERROR, "future.py", 387, "raised an exception", None, None)
    record.exc_info = (ValueError, full, None)
    assert not logging.getLogger("absl").filter(record)  # the writers' records are dropped...
    other = logging.LogRecord("absl", logging.ERROR, "future.py", 387, "another failure", None, None)
    assert logging.getLogger("absl").filter(other)  # ...and no others
