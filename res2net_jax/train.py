"""Training and evaluation, the host side: devices, the input pipeline, Orbax checkpoints, logs.

The steps themselves (one data-parallel step over every device of every host) are in
`res2net_jax.steps`, the functional core this module drives.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from res2net_jax import config_check, datasets, input_pipeline, pretrained, steps, weight_files
from res2net_jax import workdir as run_dir
from res2net_jax.errors import InvalidInputError, MissingFileError, UserError
from res2net_jax.registry import get_spec


class TrainingError(UserError, RuntimeError):
    """Training or evaluation cannot go on; the message says why and what was kept."""


# --- Devices ------------------------------------------------------------------------------


def select_devices(backend: str) -> list[jax.Device]:
    """All devices (of every host) of `backend`: 'cpu', 'gpu', 'tpu' or 'auto' (JAX's default)."""
    if backend == "auto":
        return jax.devices()
    try:
        return jax.devices(backend)
    except RuntimeError:
        available = []
        for platform in ("cpu", "gpu", "tpu"):
            try:
                jax.devices(platform)
                available.append(platform)
            except RuntimeError:
                pass
        raise InvalidInputError(
            f"config.backend={backend!r} but this machine has no {backend.upper()} for JAX; "
            f"available: {', '.join(available)} (or 'auto')"
        ) from None


def cluster_manager(environ: dict[str, str] | None = None) -> str | None:
    """The cluster manager that started this process as one of several, if JAX can find its peers from
    the environment: Slurm (srun), Open MPI (mpirun) or a multi-host TPU slice; else None."""
    env = os.environ if environ is None else environ

    def count(name: str) -> int:
        value = env.get(name, "1")
        if not value.strip().isdigit():
            raise InvalidInputError(f"the environment variable {name}={value!r} is not a process count (the "
                                    "cluster manager did not set it): unset it, or start with srun/mpirun")  # fmt: skip
        return int(value)

    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and count("SLURM_NTASKS") > 1:
        return "Slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
        # JAX reads these with no check of its own: a KeyError or ValueError traceback otherwise
        missing = [name for name in _OMPI_IDS if not env.get(name, "").strip().isdigit()]
        if missing or not re.search(r"tcp6?://", env["OMPI_MCA_orte_hnp_uri"]):
            unset = ", ".join(missing) or f"OMPI_MCA_orte_hnp_uri={env['OMPI_MCA_orte_hnp_uri']!r} (no tcp:// address)"
            raise InvalidInputError(f"an incomplete Open MPI environment ({unset}): start every process with "
                                    "mpirun, or unset OMPI_MCA_orte_hnp_uri to train alone")  # fmt: skip
        return "Open MPI"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "a multi-host TPU slice"
    return None


_OMPI_IDS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")  # beside OMPI_COMM_WORLD_SIZE


def check_process_flags(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Refuses, before JAX starts, multi-host flags that cannot form a run (JAX segfaults on a bad port
    and waits minutes on a partial set): all three or none, host:port, 0 <= process_id < num_processes."""
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}  # fmt: skip
    named = [flag for flag, value in given.items() if value is not None]
    if not named:
        return
    if len(named) < 3:
        missing = ", ".join(flag for flag in given if flag not in named)
        raise InvalidInputError(f"{', '.join(named)} without {missing}: a multi-host run started by hand names "
                                "all three on every process (under Slurm, Open MPI or a TPU slice, none)")  # fmt: skip
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(f"--coordinator_address={coordinator_address!r} is not host:port (process 0's "
                                "host and a free port, e.g. host0:1234)")  # fmt: skip
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise InvalidInputError(f"--process_id={process_id} with --num_processes={num_processes}: each process "
                                f"takes one id from 0 to {num_processes - 1}")  # fmt: skip


def start_processes(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None, timeout_s: int = 300
) -> None:
    """Joins the processes of a multi-host run: the ones named by the arguments, or those a cluster
    manager started (JAX reads them from its environment); a lone process starts alone. Waiting for the
    others says so, and gives up after `timeout_s`."""
    check_process_flags(coordinator_address, num_processes, process_id)
    manager = cluster_manager()
    if coordinator_address is None and manager is None:
        return
    where = f"at {coordinator_address}" if coordinator_address else f"started by {manager}"
    print(f"waiting up to {timeout_s} s for the processes {where} (--peer_timeout_s)", flush=True)
    # JAX aborts the process with a C++ stack trace when its own deadline passes; the watchdog ends it
    # first, with one line (os._exit: the main thread is blocked inside JAX and cannot raise).
    watchdog = threading.Timer(timeout_s, _give_up_waiting, (where, timeout_s))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address, num_processes, process_id, initialization_timeout=timeout_s + _JAX_DEADLINE_MARGIN_S
        )
    except (ValueError, RuntimeError) as err:
        hint = " (not a TPU VM? unset TPU_WORKER_HOSTNAMES)" if manager == "a multi-host TPU slice" else ""
        raise InvalidInputError(f"JAX cannot start the processes {where}: {err}{hint}") from None
    finally:
        watchdog.cancel()


_JAX_DEADLINE_MARGIN_S = 60  # JAX's own deadline comes this long after the watchdog's


def _give_up_waiting(where: str, timeout_s: int) -> None:
    """Ends a process whose peers did not all arrive within `timeout_s`, in one line."""
    print(f"error: the processes {where} did not all start within {timeout_s} s: start every process (process 0 "
          "first, each with its own --process_id), or raise --peer_timeout_s", file=sys.stderr, flush=True)  # fmt: skip
    os._exit(1)


# --- Host side --------------------------------------------------------------------------------


def _global_batches(
    batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, prefetch: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Host batches as global arrays split over all devices, `prefetch` batches ahead.

    Each batch is copied first: on the CPU a JAX array may alias host memory, and tf.data reuses
    the buffers behind the arrays it has already handed out.
    """
    queue: list[dict[str, jax.Array]] = []
    for batch in batches:
        queue.append({k: jax.make_array_from_process_local_data(sharding, np.array(v)) for k, v in batch.items()})
        if len(queue) > prefetch:
            yield queue.pop(0)
    yield from queue


class _InputWait:
    """The seconds the training loop has spent waiting for host batches, and the images they held, over
    every pipeline passed through `timed` (one per epoch)."""

    def __init__(self) -> None:
        self.waited, self.images = 0.0, 0

    def timed(self, batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.waited += time.perf_counter() - start
            if batch is None:
                return
            self.images += len(batch["label"])
            yield batch


# The share of a period's wall time spent waiting for host batches above which training is input-bound:
# the accelerators idle at least as long as they compute.
INPUT_BOUND_SHARE = 0.5


def input_bound_note(waited_s: float, elapsed_s: float, images: int) -> str | None:
    """The log line for a period whose loop waited for input more than INPUT_BOUND_SHARE of `elapsed_s`,
    with the rate the host delivered; None when the input kept up."""
    if elapsed_s <= 0 or waited_s / elapsed_s <= INPUT_BOUND_SHARE:
        return None
    return (f"input-bound: training waited for the input pipeline {100 * waited_s / elapsed_s:.0f}% of the time "
            f"since the last evaluation (the host delivered {images / elapsed_s:.0f} img/s); more CPU cores for "
            "the input pipeline, or the dataset prepared on local disk, would train faster")  # fmt: skip


def make_evaluator(
    model: nn.Module,
    builder: Any,
    info: datasets.DatasetInfo,
    crop: input_pipeline.Crop,
    eval_batch: int,
    mesh: jax.sharding.Mesh,
) -> Callable[[Any], dict[str, float]]:
    """A function from variables to their top-1, top-5 (percent) and mean loss over the whole eval split,
    in global batches of `eval_batch`; its eval step compiles once for every call."""
    eval_step = steps.make_eval_step(model)
    sharding = NamedSharding(mesh, P(steps.AXIS))

    def evaluate_variables(variables: Any) -> dict[str, float]:
        ds = input_pipeline.eval_dataset(
            builder, info, crop, eval_batch=eval_batch, process_index=jax.process_index(),
            process_count=jax.process_count(),
        )  # fmt: skip
        totals = None
        for batch in _global_batches(input_pipeline.as_numpy(ds), sharding):
            sums = eval_step(variables, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        count = float(totals["count"])
        if count != info.num_eval:
            raise TrainingError(f"evaluated {count:.0f} examples, expected {info.num_eval}")
        return {
            "top1": 100.0 * float(totals["top1"]) / count,
            "top5": 100.0 * float(totals["top5"]) / count,
            "loss": float(totals["loss"]) / count,
        }

    return evaluate_variables


def _prepare(
    config: ml_collections.ConfigDict,
) -> tuple[ml_collections.ConfigDict, jax.sharding.Mesh, Any, datasets.DatasetInfo, nn.Module]:
    """The device mesh, dataset and model a config asks for, each checked, and the config with
    image_size 0 ('auto') resolved for the dataset."""
    devices = select_devices(config.backend)
    _check_batch_sizes(config, len(devices))
    builder = datasets.get_builder(config)
    info = datasets.dataset_info(builder, config)
    if config.image_size == 0:
        config = ml_collections.ConfigDict(config.to_dict())
        config.image_size = datasets.default_image_size(builder)
    model = steps.build_model(config, info.num_classes, steps.compute_dtype(config, devices))
    return config, jax.sharding.Mesh(np.array(devices), (steps.AXIS,)), builder, info, model


def _check_batch_sizes(config: ml_collections.ConfigDict, num_devices: int) -> None:
    for field in ("batch_size", "eval_batch_size"):
        value = config[field]
        if value % num_devices or value % jax.process_count():
            raise InvalidInputError(
                f"config.{field}={value} does not split evenly over {num_devices} devices "
                f"({jax.process_count()} processes): use a multiple of {num_devices}"
            )


def _checkpoint_meta(config: ml_collections.ConfigDict, info: datasets.DatasetInfo) -> dict[str, Any]:
    return {
        "model": get_spec(config.model).name,
        "model_overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in config.model_overrides.items()},
        "num_classes": info.num_classes,
        "dataset": config.dataset,
        "batch_size": config.batch_size,
        "seed": config.seed,
    }


class _StopSignals:
    """Turns SIGTERM and Ctrl-C (SIGINT) into a flag the loop checks after each step, so that a
    preempted or interrupted run saves its state and exits cleanly. A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _local_weights(value: str) -> str:
    """The local path of config.init_weights or eval_weights: published weights (a registered name,
    hf-hub:ORG/REPO) are fetched; a path is itself."""
    return pretrained.resolve(value).weights if pretrained.is_pretrained_id(value) else value


def _initial_variables(config: ml_collections.ConfigDict, model: nn.Module, init_path: str | None) -> Any:
    """config.init_weights (`init_path` if already fetched; with a new head if reset_head), else a fresh
    initialisation."""
    init_rng, head_rng = jax.random.split(jax.random.key(config.seed))
    if config.init_weights:
        path = init_path or _local_weights(config.init_weights)
        return weight_files.load_checkpoint(model, path, reset_head=config.reset_head, rng=head_rng)
    image = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    return jax.jit(model.init)(init_rng, image)


def _abstract_state(
    config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, sharding: NamedSharding
) -> steps.TrainState:
    """The shapes, dtypes and shardings of a TrainState, for restoring without initialising."""
    image = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda: steps.init_train_state(config, tx, model.init(jax.random.key(0), image)))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


class _Log:
    """Progress lines, TensorBoard scalars and metrics.jsonl, written by process 0 only."""

    def __init__(self, directory: str):
        self.primary = jax.process_index() == 0
        self.directory = directory
        self.writer = None
        if self.primary:
            import tensorflow as tf

            self.writer = tf.summary.create_file_writer(os.path.join(directory, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops evaluations newer than the checkpoint a resumed run restarts from: it redoes them."""
        if self.primary:
            run_dir.keep_metrics_until(self.directory, step)

    def scalars(self, step: int, values: dict[str, float], prefix: str) -> None:
        if self.writer is not None:
            import tensorflow as tf

            with self.writer.as_default(step=step):
                for key, value in values.items():
                    tf.summary.scalar(f"{prefix}/{key}", value)
            self.writer.flush()

    def evaluation(self, record: dict[str, Any]) -> None:
        if self.primary:
            run_dir.append_metrics(self.directory, record)
            self.scalars(record["step"], {k: v for k, v in record.items() if k not in ("step", "epoch")}, "eval")

    def print(self, message: str) -> None:
        if self.primary:
            print(message, flush=True)


def _summary(metrics: dict[str, Any]) -> str:
    text = f"top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}% loss {metrics['loss']:.4f}"
    if "ema_top1" in metrics:
        text += f" (EMA: top-1 {metrics['ema_top1']:.2f}% top-5 {metrics['ema_top5']:.2f}%)"
    return text


def _format_eta(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def _settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON values, as recorded in WORKDIR/config.json."""
    return json.loads(config.to_json_best_effort())


def _open_workdir(config: ml_collections.ConfigDict, info: datasets.DatasetInfo, workdir: str) -> Any:
    """Creates the workdir, takes its lock, checks that it holds no other run and records the settings and
    class names (process 0 only: the other processes of a multi-host run share its workdir)."""
    if jax.process_index() != 0:
        return None
    os.makedirs(workdir, exist_ok=True)
    held = run_dir.lock(workdir)
    run_dir.check_settings(workdir, _settings(config))
    run_dir.write_class_names(workdir, list(info.class_names))
    return held


# A loss above EXPLOSION_FACTOR x the chance-level cross-entropy ln(num_classes) (what uniform predictions
# score; a network starts near it, from scratch or from pretrained weights with a new head), and never
# below EXPLOSION_FACTOR x ln(10), is an exploding run, not learning. Measured worst steps of healthy runs:
# the quickstart (10 classes, limit 46) 6.7-9.2 over seeds 0-3 on one device and 8.2-9.5 over seeds 0-2 on
# 8 devices; 7.9 for 4 classes at a constant lr 0.05 with no warmup (tests/test_failures.py). Exploding
# runs pass 1e3 within a few steps (and reached 1e9-1e17 in checkpoints once kept as healthy).
EXPLOSION_FACTOR = 20.0


def explosion_limit(num_classes: int) -> float:
    """The training loss above which a run has exploded (see EXPLOSION_FACTOR)."""
    return EXPLOSION_FACTOR * max(math.log(num_classes), math.log(10))


def _loss_problem(loss: float, limit: float) -> str | None:
    """What is wrong with a loss: not finite, or above the explosion limit; None if it is healthy."""
    if not math.isfinite(loss):
        return f"became {loss}"
    if loss > limit:
        return f"exploded to {loss:.3g} (a healthy run stays below {limit:.3g})"
    return None


def _diverged(
    what: str, bad_step: int, checkpoints: run_dir.Checkpoints, workdir: str, config: ml_collections.ConfigDict
) -> TrainingError:
    """The error for a run whose state at `bad_step` gave an exploded or non-finite loss or held non-finite
    weights: checkpoints from that step on are moved aside, and the message says how to go on."""
    kept = checkpoints.keep_before(bad_step)
    clip = "" if config.grad_clip_norm > 0 else "grad_clip_norm set (e.g. 1.0)"
    if kept is None:
        return TrainingError(
            f"{what}; no checkpoint from before step {bad_step} was written, so {workdir} holds nothing to resume: "
            f"start a new --workdir with a learning_rate lower than {config.learning_rate:g}"
            + (f" and {clip}" if clip else "")
        )
    return TrainingError(
        f"{what}; the newest checkpoint before it, step {kept}, is kept in {workdir} (the later ones are moved "
        f"to {run_dir.DAMAGED}/). Rerun with a learning_rate lower than {config.learning_rate:g}: it resumes from "
        f"step {kept}" + (f"; or start a new --workdir with {clip}" if clip else "")
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from the workdir's newest good checkpoint) and evaluates; returns the last metrics.

    Every config field is checked, and the devices, dataset and model are set up, before the workdir
    is created or locked.
    """
    config_check.check(config)
    config, mesh, builder, info, model = _prepare(config)
    # A step is one optimiser update: schedule, EMA, logs, checkpoints and epochs all count updates.
    update_batch = steps.update_batch_size(config)
    steps_per_epoch = info.num_train // update_batch
    if steps_per_epoch == 0:
        raise InvalidInputError(
            f"batch_size x grad_accum_steps = {update_batch} exceeds the {info.num_train} training examples"
        )
    total_steps = config.num_train_steps if config.num_train_steps > 0 else config.num_epochs * steps_per_epoch
    schedule = steps.learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = steps.create_optimizer(config, schedule)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(steps.AXIS))
    # Published weights are fetched before the workdir is made: an unreachable hub leaves nothing behind.
    init_path = _local_weights(config.init_weights) if config.init_weights and not run_dir.has_run(workdir) else None

    held_lock = _open_workdir(config, info, workdir)  # noqa: F841 - the lock lasts as long as this reference
    meta = _checkpoint_meta(config, info)
    checkpoints = run_dir.Checkpoints(workdir, config.keep_checkpoints)
    log = _Log(workdir)
    stop = _StopSignals()
    try:
        state = checkpoints.restore(_abstract_state(config, model, tx, replicated), meta)
        if state is None:
            variables = _initial_variables(config, model, init_path)
            state = jax.device_put(steps.init_train_state(config, tx, variables), replicated)
        else:
            log.print(f"resumed from step {int(state.step)} in {workdir}")
        log.truncate_after(int(state.step))
        train_step = steps.make_train_step(model, tx, config, mesh)
        crop = input_pipeline.Crop.from_config(config)
        evaluator = make_evaluator(model, builder, info, crop, config.eval_batch_size, mesh)
        eval_every = max(1, int(config.eval_every_epochs * steps_per_epoch))
        last: dict[str, Any] = {}
        pending: list[tuple[int, jax.Array]] = []

        limit = explosion_limit(info.num_classes)

        def check_losses() -> None:
            for step, loss in pending:
                problem = _loss_problem(float(loss), limit)
                if problem:  # the loss of step N is computed on the state after N - 1 updates
                    raise _diverged(f"the loss {problem} at step {step}", step - 1, checkpoints, workdir, config)
            pending.clear()

        def save(state: steps.TrainState, metrics: dict | None = None) -> None:
            check_losses()
            try:
                checkpoints.save(state, meta, metrics)
            except run_dir.NonFiniteStateError as err:
                raise _diverged(f"the weights stopped being finite ({err})", int(state.step), checkpoints,
                                workdir, config) from None  # fmt: skip

        step = int(state.step)
        tic, tic_step = time.time(), step
        input_wait = _InputWait()
        period = (time.perf_counter(), 0.0, 0)  # when the evaluation period began, and the wait and images then
        while step < total_steps:
            epoch, start = divmod(step, steps_per_epoch)
            ds = input_pipeline.train_dataset(
                builder, info, crop, global_batch=update_batch, seed=config.seed, epoch=epoch, start_batch=start,
                process_index=jax.process_index(), process_count=jax.process_count(),
            )  # fmt: skip
            for batch in _global_batches(input_wait.timed(input_pipeline.as_numpy(ds)), split):
                state, metrics = train_step(state, batch)
                step += 1
                pending.append((step, metrics["loss"]))
                if step % config.log_every_steps == 0 or step == total_steps:
                    check_losses()
                    rate = (step - tic_step) * update_batch / (time.time() - tic)
                    loss, lr = float(metrics["loss"]), float(schedule(step))
                    eta = _format_eta((total_steps - step) * update_batch / max(rate, 1e-9))
                    log.print(
                        f"step {step}/{total_steps} [{100 * step / total_steps:3.0f}%] epoch "
                        f"{step / steps_per_epoch:.2f} loss {loss:.4f} lr {lr:.4g} {rate:.0f} img/s ETA {eta}"
                    )
                    log.scalars(
                        step, {"loss": loss, "learning_rate": lr, "grad_norm": float(metrics["grad_norm"])}, "train"
                    )
                    tic, tic_step = time.time(), step
                if step % eval_every == 0 or step == total_steps:
                    started, waited, images = period
                    note = input_bound_note(input_wait.waited - waited, time.perf_counter() - started,
                                            input_wait.images - images)  # fmt: skip
                    if note:
                        log.print(note)
                    period = (time.perf_counter(), input_wait.waited, input_wait.images)
                    check_losses()
                    last = _evaluate_state(evaluator, state, step / steps_per_epoch, config.ema_decay > 0)
                    # Only a non-finite evaluation loss: early in training, BN's running statistics lag the
                    # weights, and a healthy 2-epoch quickstart evaluated at loss 37.
                    if not math.isfinite(last["loss"]):
                        raise _diverged(f"the evaluation loss became {last['loss']} at step {step}", step,
                                        checkpoints, workdir, config)  # fmt: skip
                    log.evaluation(last)
                    log.print(f"eval step {step} epoch {last['epoch']:.2f}: {_summary(last)}")
                    save(state, {"top1": last["top1"]})
                elif step % config.checkpoint_every_steps == 0:
                    save(state)
                if stop.received:
                    save(state)
                    checkpoints.wait()
                    log.print(f"{stop.received}: saved step {step} to {workdir}; the same command resumes from there")
                    return {"preempted": True, "step": step}
                if step >= total_steps:
                    break
        save(state)
        checkpoints.wait()
        if not last:
            last = _evaluate_state(evaluator, state, step / steps_per_epoch, config.ema_decay > 0)
    finally:
        stop.restore()
        checkpoints.close()
    log.print(f"final (step {last['step']}): {_summary(last)}")
    return last


def _evaluate_state(
    evaluator: Callable[[Any], dict[str, float]], state: steps.TrainState, epoch: float, with_ema: bool
) -> dict[str, Any]:
    """The evaluation record of a training state at `epoch`: its weights', and its EMA weights' if kept."""
    record: dict[str, Any] = {"step": int(state.step), "epoch": round(epoch, 4)}
    record.update(evaluator({"params": state.params, "batch_stats": state.batch_stats}))
    if with_ema:
        metrics = evaluator({"params": state.ema_params, "batch_stats": state.ema_batch_stats})
        record.update({f"ema_{k}": v for k, v in metrics.items()})
    return record


def evaluate(config: ml_collections.ConfigDict, workdir: str | None) -> dict[str, Any]:
    """Validates config.eval_weights (published weights by name or hf-hub id, a weights file, an Orbax
    directory or a training run: see `workdir.locate`), else the workdir's newest good checkpoint, and its
    EMA weights if the config keeps them. The result is printed and, given a workdir, appended to
    WORKDIR/eval.jsonl. A non-finite loss is an error."""
    config_check.check(config, mode="eval")
    source = _local_weights(config.eval_weights) if config.eval_weights else workdir or ""
    if not config.eval_weights and (not workdir or run_dir.locate(workdir) is None):
        raise MissingFileError(f"no checkpoint in {workdir}: train first, or name weights with --config.eval_weights")
    config, mesh, builder, info, model = _prepare(config)
    crop = input_pipeline.Crop.from_config(config)
    evaluator = make_evaluator(model, builder, info, crop, config.eval_batch_size, mesh)
    record: dict[str, Any] = {"weights": os.path.abspath(source), "dataset": config.dataset, "split": info.eval_split}
    kinds = {"": False, "ema_": True} if config.ema_decay > 0 and run_dir.locate(source) else {"": False}
    for prefix, ema in kinds.items():
        variables = weight_files.load_checkpoint(model, source, ema=ema)
        variables = jax.device_put(variables, NamedSharding(mesh, P()))
        metrics = evaluator(variables)
        if not math.isfinite(metrics["loss"]):
            raise TrainingError(f"the evaluation loss of {source} is {metrics['loss']}: its weights do not compute "
                                "finite logits on this data")  # fmt: skip
        record.update({f"{prefix}{k}": v for k, v in metrics.items()})
    if jax.process_index() == 0:
        if workdir:
            os.makedirs(workdir, exist_ok=True)
            run_dir.append_metrics(workdir, record, run_dir.EVALUATIONS)
        print(f"eval of {source} on {config.dataset} {info.eval_split} ({info.num_eval} images): {_summary(record)}")
    return record
