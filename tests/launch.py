"""How the tests run main.py: a small Res2Net on generated data, on fake CPU devices, in a process of its own
(`run`, `popen`) or, where the process is not what is tested, in the test's (`run_here`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags
from PIL import Image

from res2net_jax import weight_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
MODEL = "res2net50"  # what `command` trains: configs/quickstart.py's model, with one block per stage (the
OVERRIDES = {"layers": (1, 1, 1, 1), "base_width": 4}  # config's) and 4-channel branches (`command`'s)


def command(workdir: str, dataset: str, *overrides: str) -> list[str]:
    """main.py on the quickstart config, reduced to 4-channel branches and STEPS steps; `overrides` last."""
    return [
        sys.executable, "main.py", "--config=configs/quickstart.py", f"--workdir={workdir}",
        f"--config.dataset={dataset}", f"--config.num_train_steps={STEPS}", "--config.batch_size=16",
        "--config.eval_batch_size=40", "--config.log_every_steps=2", "--config.checkpoint_every_steps=2",
        "--config.model_overrides.base_width=4", "--config.mixup_alpha=0.2", "--config.cutmix_alpha=1.0",
        "--config.color_jitter=0.4", "--config.random_erasing=0.25", "--config.ema_decay=0.9",
        "--config.label_smoothing=0.1", *overrides,
    ]  # fmt: skip


def config_of(argv: list[str]) -> ml_collections.ConfigDict:
    """The config a main.py command line gives (its --config file, relative to the repository, and its
    --config.FIELD settings), built in this process by main.py's flag parsing, for the checks that need no
    process of their own."""
    (path,) = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    settings = [arg for arg in argv if arg.startswith("--config.")]
    parsed = ["main.py", f"--config={os.path.join(ROOT, path)}", *settings]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "the config file", flag_values=values, sys_argv=parsed)
    values(parsed)
    return values.config


def config(workdir: str, dataset: str, *overrides: str) -> ml_collections.ConfigDict:
    """The config that `command` gives main.py (`config_of`)."""
    return config_of(command(workdir, dataset, *overrides))


def env(devices: int) -> dict[str, str]:
    """The environment for `devices` fake CPU devices."""
    return dict(
        os.environ,
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip(),
        CUDA_VISIBLE_DEVICES="",
        JAX_PLATFORMS="cpu",
    )


def run(workdir: str, dataset: str, *overrides: str, devices: int = 8, mode: str = "train",
        timeout: int = 900) -> subprocess.CompletedProcess:  # fmt: skip
    return subprocess.run(
        [*command(workdir, dataset, *overrides), f"--mode={mode}"], cwd=ROOT, env=env(devices),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@contextlib.contextmanager
def _compilation_cache() -> Iterator[None]:
    """JAX's persistent compilation cache in JAX_COMPILATION_CACHE_DIR (the `xla_cache` fixture's, which
    main.py's runs read), for this process's compilations in the block only."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    max_size = int(os.environ.get("JAX_COMPILATION_CACHE_MAX_SIZE", -1))  # set: reads and writes take a file lock
    settings = {"jax_compilation_cache_dir": path, "jax_persistent_cache_min_compile_time_secs": 0,
                "jax_compilation_cache_max_size": max_size}  # fmt: skip
    before = {name: getattr(jax.config, name) for name in settings}
    if path:
        for name, value in settings.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
    try:
        yield
    finally:
        if path:
            for name, value in before.items():
                jax.config.update(name, value)
            compilation_cache.reset_cache()


def run_here(workdir: str, dataset: str, *overrides: str, mode: str = "train") -> subprocess.CompletedProcess:
    """`run` on this process's one CPU device, for the checks where the process boundary is not what is
    tested: main.py's output (a user's error as its one `error:` line, status 1) without its start-up,
    about half of a 6-step run. The tests of main.py's own contract (flags, exit codes, what reaches the
    terminal) start it with `run`."""
    import jax

    from res2net_jax import cli, errors, train

    assert jax.device_count() == 1, "run_here trains on one device: use run(..., devices=N)"
    settings = config(workdir, dataset, *overrides)
    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), _compilation_cache():
        try:
            (train.train_and_evaluate if mode == "train" else train.evaluate)(settings, os.path.abspath(workdir))
        except errors.UserError as err:
            print(f"error: {cli.one_line(err)}", file=sys.stderr)
            returncode = 1
    return subprocess.CompletedProcess(["main.py", f"--mode={mode}"], returncode, stdout.getvalue(), stderr.getvalue())


# The runner of `cli_calls`: MODULE's main for each ARGS in turn, as `cli.run` runs it under `python -m`.
CLI_CALLS = """
import contextlib, importlib, io, json, sys
from absl import flags
from res2net_jax import cli

name, calls = sys.argv[1], json.loads(sys.argv[2])
module, results = importlib.import_module(name), []
for args in calls:
    flags.FLAGS.unparse_flags()
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            cli.run(module.main, argv=[name, *args])
        except SystemExit as end:
            code = end.code or 0
            if isinstance(code, str):  # sys.exit(message): Python prints it and exits 1
                print(code, file=sys.stderr)
                code = 1
    results.append([code, stdout.getvalue(), stderr.getvalue()])
print(json.dumps(results))
"""


def cli_calls(module: str, *calls: list[str]) -> list[subprocess.CompletedProcess]:
    """`python -m MODULE ARGS` for each ARGS of `calls`, in one process that imports MODULE once, for the
    checks of what each call prints and returns where a process per call is not what is tested: each
    call's flags are parsed from their defaults, its stdout and stderr captured apart. Anything the
    process writes outside the calls' Python streams (a C++ library's log line) fails here."""
    done = subprocess.run([sys.executable, "-c", CLI_CALLS, module, json.dumps(calls)], cwd=ROOT, env=env(1),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0 and not done.stderr, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return [subprocess.CompletedProcess([module, *args], *result) for args, result in zip(calls, results, strict=True)]


def train_run(workdir: str, dataset: str, *overrides: str, devices: int = 8) -> str:
    """`workdir` after a finished run of `command` (its stderr's end if it failed)."""
    done = run(workdir, dataset, *overrides, devices=devices)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def popen(workdir: str, dataset: str, *overrides: str, devices: int = 8) -> subprocess.Popen:
    """main.py in the background, stdout and stderr together, line by line."""
    return subprocess.Popen(command(workdir, dataset, *overrides), cwd=ROOT, env=env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def run_variables(path: str, ema: bool = False) -> dict:
    """The variables of a run of `command`: WORKDIR, WORKDIR/best or a step of either (its EMA's with `ema`)."""
    return weight_files.load_variables(path, MODEL, overrides=OVERRIDES, ema=ema)


def metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def noise_images(root: str) -> str:
    """folder:ROOT of random-noise images in 4 classes (48 train, 20 validation each).

    Noise, unlike the digits' flat backgrounds, has no exactly tied maxima, whose gradient goes to one
    element chosen by rounding and so can differ between device counts.
    """
    rng = np.random.RandomState(0)
    for split, count in [("train", 48), ("validation", 20)]:
        for label in range(4):
            os.makedirs(os.path.join(root, split, f"class{label}"))
            for i in range(count):
                pixels = (rng.rand(36, 36, 3) * 255).astype(np.uint8)
                pixels[..., label % 3] //= 2  # a learnable colour cue per class
                Image.fromarray(pixels).save(os.path.join(root, split, f"class{label}", f"{i}.png"))
    return f"folder:{root}"


def assert_one_line_error(done: subprocess.CompletedProcess, text: str) -> None:
    """Exit status 1 and a single stderr line holding `text`: no traceback for a user's mistake."""
    assert done.returncode == 1, done.stderr[-3000:]
    assert len(done.stderr.strip().splitlines()) == 1 and text in done.stderr, done.stderr[-3000:]
