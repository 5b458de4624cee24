"""main.py end to end on CPU: device-count invariance, exact resume after kill -9, SIGTERM, errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import hub_cache
from launch import (
    MODEL,
    OVERRIDES,
    ROOT,
    assert_one_line_error,
    command,
    config,
    env,
    metrics,
    popen,
    run,
    run_here,
    run_variables,
    train_run,
)

from res2net_jax import convert, save_pretrained, train, weight_files
from res2net_jax.errors import UserError

SHORT = "--config.num_train_steps=3"


def _params(workdir: str) -> dict:
    return run_variables(workdir)["params"]


pytestmark = pytest.mark.usefixtures("xla_cache")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory, noise_folder: str) -> str:
    return train_run(str(tmp_path_factory.mktemp("reference")), noise_folder)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory, noise_folder: str) -> str:
    """3 steps on 8 devices: the reference for the device-count comparisons.

    Compared after a few steps: float rounding differs with the device count (reduction order, also in
    the on-device augmentation's colour jitter, at 1e-6) and early training amplifies it by about 10x
    per step: after 3 steps weights differ by up to 9e-5 (measured), after 12 steps at 1e-2.
    """
    return train_run(str(tmp_path_factory.mktemp("short")), noise_folder, SHORT)


def _assert_same_training(workdir: str, reference: str) -> None:
    for a, b in zip(_leaves(_params(workdir)), _leaves(_params(reference)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)
    ours, theirs = metrics(workdir)[-1], metrics(reference)[-1]
    assert ours["step"] == theirs["step"] == 3
    assert abs(ours["loss"] - theirs["loss"]) < 1e-4


def test_eight_devices_train_like_one(short_run: str, noise_folder: str, tmp_path) -> None:
    done = run_here(str(tmp_path), noise_folder, SHORT)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_training(str(tmp_path), short_run)


def _leaves(tree: dict) -> list[np.ndarray]:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_gradient_accumulation_counts_updates_on_any_device_count(noise_folder: str, tmp_path) -> None:
    """grad_accum_steps=2 x batch_size=8: the 192 training images make 12 updates an epoch, so warmup
    1/12 epoch is 1 update and the cosine then reaches 0 at step 3 (lr 0.01, 0.005, 0 by hand); 8
    devices train like 1, each pass being the same 8 examples. (At the quickstart's lr 0.05 this seed's
    third batch drives the loss to 3, where the stem's weight gradient, summed over each device's one
    example, differs by float32 rounding by up to 4e-4 between 8 devices and 1; 2 and 4 devices agree
    with 1 within 3e-7 there.)"""
    accumulate = (SHORT, "--config.grad_accum_steps=2", "--config.batch_size=8", "--config.warmup_epochs=0.0834",
                  "--config.log_every_steps=1", "--config.learning_rate=0.01")  # fmt: skip
    runs = {devices: str(tmp_path / str(devices)) for devices in (8, 1)}
    for devices, workdir in runs.items():  # 8 in a process of their own, 1 in this one
        done = run(workdir, noise_folder, *accumulate) if devices == 8 else run_here(workdir, noise_folder, *accumulate)
        assert done.returncode == 0, done.stderr[-3000:]
    logged = re.findall(r"^step (\S+) .* epoch (\S+) loss \S+ lr (\S+) ", done.stdout, re.MULTILINE)
    assert logged == [("1/3", "0.08", "0.01"), ("2/3", "0.17", "0.005"), ("3/3", "0.25", "0")]
    for a, b in zip(_leaves(_params(runs[8])), _leaves(_params(runs[1])), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)


def test_output_files_and_last_line(reference_run: str) -> None:
    records = metrics(reference_run)
    assert {"step", "epoch", "top1", "top5", "loss", "ema_top1"} <= set(records[-1])
    assert os.listdir(os.path.join(reference_run, "tensorboard"))
    assert os.listdir(os.path.join(reference_run, "best"))


def test_kill_9_then_rerun_ends_exactly_like_an_uninterrupted_run(
    reference_run: str, noise_folder: str, tmp_path
) -> None:
    workdir = str(tmp_path)
    process = popen(workdir, noise_folder)
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
    done = run(workdir, noise_folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step" in done.stdout
    assert metrics(workdir) == metrics(reference_run)
    for a, b in zip(_leaves(_params(workdir)), _leaves(_params(reference_run)), strict=True):
        np.testing.assert_array_equal(a, b)
    assert done.stdout.strip().splitlines()[-1].startswith("final (step 12): top-1 ")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_and_exit_cleanly(stop: signal.Signals, noise_folder: str, tmp_path) -> None:
    workdir = str(tmp_path)
    process = popen(workdir, noise_folder)
    for line in process.stdout:
        if line.startswith("step 4/"):
            process.send_signal(stop)
            break
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    assert "Traceback" not in output and f"{stop.name}: saved step" in output
    saved = int(output.split(f"{stop.name}: saved step ")[1].split()[0])
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    assert manager.latest_step() == saved
    manager.close()


def test_bad_inputs_are_clear_errors(
    noise_folder: str, reference_run: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refusal names the problem before the workdir is made, checked in this process; main.py's own
    contract (one line, no traceback) on an unknown field, a batch that does not split over 8 devices and
    weights not in an empty offline hub cache (huggingface_hub reads its settings when first imported)."""
    new = str(tmp_path / "new")
    refusals = [
        (noise_folder, ["--config.model=res2net5O"], "unknown model 'res2net5O'"),
        (noise_folder, ["--config.backend=tpu"], "no TPU.*available: cpu"),
        ("folder:/no/such/folder", [], "image folder /no/such/folder does not exist"),
    ]
    for dataset, overrides, message in refusals:
        with pytest.raises(UserError, match=message):
            train.train_and_evaluate(config(new, dataset, *overrides), new)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache, and no network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    done = run(new, noise_folder, "--config.init_weights=hf-hub:org/not-cached", devices=1)
    assert_one_line_error(done, "org/not-cached/model.safetensors is not in the Hugging Face cache")
    done = run(new, noise_folder, "--config.learning_rte=0.1")
    assert_one_line_error(done, """unknown config field 'learning_rte' Did you mean "learning_rate" instead""")
    done = run(new, noise_folder, "--config.batch_size=12")
    assert_one_line_error(done, "batch_size=12 does not split evenly over 8 devices")
    assert not os.path.exists(new)  # refused before the workdir is made
    before = sorted(os.listdir(os.path.join(reference_run, "checkpoints")))
    with pytest.raises(UserError, match=re.escape("holds another run (model: 'res2net50' there, 'res2net50d' now")):
        train.train_and_evaluate(config(reference_run, noise_folder, "--config.model=res2net50d"), reference_run)
    assert sorted(os.listdir(os.path.join(reference_run, "checkpoints"))) == before


def test_eval_mode_reproduces_the_final_metrics(reference_run: str, noise_folder: str) -> None:
    done = run(reference_run, noise_folder, mode="eval")
    assert done.returncode == 0, done.stderr[-3000:]
    final = metrics(reference_run)[-1]
    assert f"top-1 {final['top1']:.2f}% top-5 {final['top5']:.2f}%" in done.stdout


def test_eval_mode_takes_a_mindspore_checkpoint(reference_run: str, noise_folder: str, tmp_path) -> None:
    weights = str(tmp_path / "exported.ckpt")
    weight_files.to_mindspore(run_variables(reference_run), MODEL, weights, OVERRIDES)
    done = run_here(str(tmp_path / "eval"), noise_folder, f"--config.eval_weights={weights}", mode="eval")
    assert done.returncode == 0, done.stderr[-3000:]
    final = metrics(reference_run)[-1]
    assert f"top-1 {final['top1']:.2f}% top-5 {final['top5']:.2f}%" in done.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm(index: int, port: int) -> dict[str, str]:
    """What srun sets for task `index` of 2 on one node; JAX_COORDINATOR_PORT replaces the port JAX
    would derive from the job id."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(index), "SLURM_LOCALID": str(index), "JAX_COORDINATOR_PORT": str(port)}  # fmt: skip


@pytest.mark.parametrize("started_by", ["flags", "slurm"])
def test_two_processes_on_loopback_form_one_run(started_by: str, short_run: str, noise_folder: str, tmp_path) -> None:
    """2 processes x 2 devices train like the 8-device run (same global batch), whether named by flags or
    started by Slurm (only its environment variables, no flags).

    Both processes save the latest and the best checkpoint of the same step at an evaluation: this
    also guards against their Orbax barriers colliding (it hung, then aborted, before they had prefixes).
    """
    workdir = str(tmp_path)
    port = _free_port()
    flags = {index: [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={index}"]
             for index in range(2)}  # fmt: skip
    processes = [
        subprocess.Popen(
            [*command(workdir, noise_folder, SHORT), *(flags[index] if started_by == "flags" else [])],
            cwd=ROOT,
            # The two write the same compilation cache entries at once; the second case reads them.
            env={**env(2), **(_slurm(index, port) if started_by == "slurm" else {})},
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
    ten_classes = run_variables(reference_run)
    ten_classes["params"]["fc"] = {"kernel": np.ones((2048, 10), np.float32), "bias": np.zeros(10, np.float32)}
    weights = str(tmp_path / "pretrained.safetensors")
    weight_files.save_state_dict(convert.to_torch(ten_classes, MODEL, OVERRIDES), weights)
    workdir = str(tmp_path / "run")
    done = run_here(workdir, noise_folder, f"--config.init_weights={weights}", "--config.num_train_steps=1")
    assert done.returncode != 0 and "reset_head=True" in done.stderr  # 10 vs 4 classes is refused...
    done = run_here(workdir, noise_folder, f"--config.init_weights={weights}", "--config.reset_head=True",
                    "--config.num_train_steps=1", "--config.learning_rate=0", "--config.weight_decay=0",
                    "--config.ema_decay=0")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]  # ...unless the head is replaced
    tuned = _params(workdir)
    assert tuned["fc"]["kernel"].shape == (2048, 4)
    np.testing.assert_array_equal(
        tuned["layer1_0"]["conv1"]["kernel"], ten_classes["params"]["layer1_0"]["conv1"]["kernel"]
    )
    # The same weights as a hub repo, read offline from huggingface_hub's cache: init_weights=hf-hub:...
    save_pretrained(tmp_path / "saved", MODEL, ten_classes, overrides=OVERRIDES)
    files = {name: (tmp_path / "saved" / name).read_bytes() for name in ("model.safetensors", "config.json")}
    hub_cache(str(tmp_path / "hf"), "someone/digits10", files)
    hub = dict(env(1), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    from_hub = str(tmp_path / "from_hub")
    done = subprocess.run(
        [*command(from_hub, noise_folder, "--config.init_weights=hf-hub:someone/digits10", "--config.reset_head=True",
                  "--config.num_train_steps=1", "--config.learning_rate=0", "--config.weight_decay=0",
                  "--config.ema_decay=0"), "--mode=train"],
        cwd=ROOT, env=hub, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_array_equal(
        _params(from_hub)["layer1_0"]["conv1"]["kernel"], tuned["layer1_0"]["conv1"]["kernel"]
    )


def test_an_input_bound_period_is_reported_with_the_host_rate() -> None:
    """The loop's wait for host batches is timed (here a pipeline that takes 50 ms a batch of 8), and a
    period that waited more than half its time is one line with the host's rate; one that did not is none."""
    from res2net_jax import train

    def slow_pipeline():
        for _ in range(4):
            time.sleep(0.05)
            yield {"image": np.zeros((8, 4, 4, 3), np.uint8), "label": np.zeros(8, np.int32)}

    wait = train._InputWait()
    assert len(list(wait.timed(slow_pipeline()))) == 4 and wait.images == 32 and 0.2 <= wait.waited < 0.4
    assert len(list(wait.timed(slow_pipeline()))) == 4 and wait.images == 64 and 0.4 <= wait.waited < 0.8  # epochs add
    note = train.input_bound_note(waited_s=6.0, elapsed_s=10.0, images=4000)
    assert note == ("input-bound: training waited for the input pipeline 60% of the time since the last evaluation "
                    "(the host delivered 400 img/s); more CPU cores for the input pipeline, or the dataset prepared "
                    "on local disk, would train faster")  # fmt: skip
    assert train.input_bound_note(waited_s=5.0, elapsed_s=10.0, images=4000) is None  # half: the input kept up


@pytest.mark.parametrize(
    ("started_by", "message"),
    [
        ("process 0, no peer", "did not all start within 3 s: start every process (process 0 first"),
        ("process 1, no coordinator", "did not all start within 3 s"),
        ("a TPU slice's variables on a CPU", "(not a TPU VM? unset TPU_WORKER_HOSTNAMES)"),
    ],
)
def test_a_multi_host_start_that_cannot_complete_is_one_line(started_by: str, message: str, tmp_path) -> None:
    """JAX aborted after its deadline with a C++ stack trace blaming "another task", and a TPU slice's
    variables on a machine without TPUs were a ValueError traceback; neither leaves a workdir."""
    workdir = tmp_path / "run"
    port = _free_port()
    flags, extra = {
        "process 0, no peer": ([f"--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=0"], {}),
        "process 1, no coordinator": (
            [f"--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=1"],
            {},
        ),
        "a TPU slice's variables on a CPU": ([], {"TPU_WORKER_HOSTNAMES": "127.0.0.1,127.0.0.2"}),
    }[started_by]
    started = time.monotonic()
    done = subprocess.run([*command(str(workdir), "digits"), *flags, "--peer_timeout_s=3"], cwd=ROOT,
                          env={**env(1), **extra}, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert_one_line_error(done, message)
    assert time.monotonic() - started < 60 and not workdir.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"process_id": 1}, "--process_id without --coordinator_address, --num_processes: a multi-host run"),
        ({"coordinator_address": "h:1", "num_processes": 2}, "without --process_id"),
        ({"coordinator_address": "localhost:notaport", "num_processes": 2, "process_id": 0}, "is not host:port"),
        ({"coordinator_address": ":1234", "num_processes": 2, "process_id": 0}, "is not host:port"),
        ({"coordinator_address": "h:1234", "num_processes": 2, "process_id": 2}, "takes one id from 0 to 1"),
        ({"coordinator_address": "h:1234", "num_processes": 0, "process_id": 0}, "takes one id from 0 to -1"),
    ],
)
def test_multi_host_flags_are_checked_before_jax_starts(flags: dict, message: str) -> None:
    """JAX segfaulted on a port that is not a number and ignored --process_id alone."""
    from res2net_jax import errors, train

    settings = {"coordinator_address": None, "num_processes": None, "process_id": None, **flags}
    with pytest.raises(errors.InvalidInputError, match=re.escape(message)):
        train.check_process_flags(**settings)


def test_a_cluster_managers_garbled_environment_is_one_line() -> None:
    from res2net_jax import errors, train

    slurm = {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "h", "SLURM_NTASKS": "two", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}  # fmt: skip
    with pytest.raises(errors.InvalidInputError, match="SLURM_NTASKS='two' is not a process count"):
        train.cluster_manager(slurm)
    with pytest.raises(errors.InvalidInputError, match="OMPI_COMM_WORLD_SIZE='' is not a process count"):
        train.cluster_manager({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": ""})
    ompi = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://127.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}  # fmt: skip
    assert train.cluster_manager(ompi) == "Open MPI"
    partial = {k: v for k, v in ompi.items() if k != "OMPI_COMM_WORLD_RANK"}
    with pytest.raises(errors.InvalidInputError, match=r"incomplete Open MPI environment \(OMPI_COMM_WORLD_RANK\)"):
        train.cluster_manager(partial)
    with pytest.raises(errors.InvalidInputError, match="no tcp:// address"):
        train.cluster_manager({**ompi, "OMPI_MCA_orte_hnp_uri": "x"})
    assert train.cluster_manager({**slurm, "SLURM_NTASKS": "2"}) == "Slurm"
