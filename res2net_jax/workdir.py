"""A training run's directory: its lock, its settings, its checkpoints and its metrics file.

    WORKDIR/.lock            held (flock) by the process that trains in it; names host and PID
    WORKDIR/config.json      the settings of the run the workdir belongs to
    WORKDIR/checkpoints/N/   the latest checkpoints (Orbax items `state` and `meta`)
    WORKDIR/best/N/          the best checkpoint by top-1
    WORKDIR/damaged/         checkpoints that failed to restore or diverged, moved aside (never deleted)
    WORKDIR/metrics.jsonl    one JSON line per evaluation during training
    WORKDIR/eval.jsonl       one JSON line per --mode=eval
    WORKDIR/classes.txt      the dataset's class names, one a line

Restoring falls back from a damaged or non-finite checkpoint to the newest one that restores and is
finite; saving refuses a non-finite state, so no checkpoint ever holds NaN or infinite values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import gc
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from res2net_jax.errors import InvalidInputError, MissingFileError, UserError

CHECKPOINTS, BEST, DAMAGED = "checkpoints", "best", "damaged"
CONFIG, METRICS, LOCK, CLASSES = "config.json", "metrics.jsonl", ".lock", "classes.txt"
EVALUATIONS = "eval.jsonl"  # one line per --mode=eval
# Settings a rerun may change without becoming another run: how long it trains, how often it
# reports and saves, where the data and devices are, and the learning rate (to resume a diverged run).
RESUMABLE_FIELDS = frozenset({
    "num_epochs", "num_train_steps", "log_every_steps", "eval_every_epochs", "checkpoint_every_steps",
    "keep_checkpoints", "eval_batch_size", "data_dir", "backend", "eval_weights", "learning_rate",
})  # fmt: skip


class WorkdirBusyError(UserError):
    """Another live process trains in this workdir."""


class NonFiniteStateError(UserError):
    """A state with NaN or infinite values, which is never checkpointed."""


class DiskFullError(UserError):
    """The workdir's disk filled up while a checkpoint was written."""


def _is_disk_full(err: BaseException | str) -> bool:
    """Whether an error or log message (Orbax's, TensorStore's or the OS's, whatever its type) is a full
    disk."""
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err)


class _HideDiskFull(logging.Filter):
    """Drops the log records of Orbax's writer threads about a full disk (with their tracebacks: about
    1,500 lines per checkpoint): `Checkpoints` reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_is_disk_full(record.getMessage()) or (record.exc_info and _is_disk_full(record.exc_info[1])))


# --- Lock ---------------------------------------------------------------------------------------


def lock(workdir: str) -> Any:
    """Takes the workdir's lock for this process's lifetime and returns its open file (keep it).

    The lock is an flock on WORKDIR/.lock: the kernel releases it when the holder exits in any way
    (kill -9 included), so a stale lock never blocks. The file names the holder for the message.
    """
    path = os.path.join(workdir, LOCK)
    handle = open(path, "a+")  # held open, and so locked, until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise WorkdirBusyError(
            f"{workdir} is in use by {holder}: wait for that run to end, or use another --workdir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()} PID {os.getpid()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    handle.flush()
    return handle


# --- Settings -----------------------------------------------------------------------------------


def check_settings(workdir: str, settings: Mapping[str, Any]) -> None:
    """Refuses settings that make another run than the one in the workdir, then records them.

    `settings` are the config as JSON values. Once the workdir holds a checkpoint or a metrics line,
    its fields outside RESUMABLE_FIELDS must equal those of WORKDIR/config.json. (A workdir whose
    config.json was removed is checked against its checkpoints' metadata alone, on restoring.)
    """
    settings = json.loads(json.dumps(dict(settings)))
    if has_run(workdir):
        recorded = read_settings(workdir)
        if recorded is None:
            return
        changed = sorted(k for k in settings if k not in RESUMABLE_FIELDS and recorded.get(k) != settings[k])
        if changed:
            detail = "; ".join(f"{k}: {recorded.get(k)!r} there, {settings.get(k)!r} now" for k in changed[:6])
            raise InvalidInputError(
                f"{workdir} holds another run ({detail}): use a new --workdir, or its settings to resume it"
            )
    _write_json_atomically(os.path.join(workdir, CONFIG), settings)


def read_settings(workdir: str) -> dict[str, Any] | None:
    """The settings recorded in WORKDIR/config.json; None where there is none (a checkpoint directory
    copied without its run's files)."""
    path = os.path.join(workdir, CONFIG)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"{path} is unreadable ({err}): restore it, or use another --workdir") from None


def _write_text_atomically(path: str, text: str) -> None:
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


def _write_json_atomically(path: str, value: Any) -> None:
    _write_text_atomically(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def has_run(workdir: str) -> bool:
    """Whether a run has left a checkpoint or an evaluation in the workdir."""
    for name in (CHECKPOINTS, BEST):
        directory = os.path.join(workdir, name)
        if os.path.isdir(directory) and any(entry.isdigit() for entry in os.listdir(directory)):
            return True
    metrics = os.path.join(workdir, METRICS)
    return os.path.exists(metrics) and os.path.getsize(metrics) > 0


# --- Metrics ------------------------------------------------------------------------------------


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The evaluation records in WORKDIR/metrics.jsonl; a torn line (a write cut short) is dropped."""
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                print(f"warning: dropped the unreadable line {number} of {path}", file=sys.stderr, flush=True)
    return records


def keep_metrics_until(workdir: str, step: int) -> None:
    """Drops records newer than `step` (a resumed run redoes them) and torn lines."""
    if os.path.exists(os.path.join(workdir, METRICS)):
        kept = [record for record in read_metrics(workdir) if record.get("step", 0) <= step]
        _write_text_atomically(os.path.join(workdir, METRICS), "".join(json.dumps(r) + "\n" for r in kept))


def append_metrics(workdir: str, record: Mapping[str, Any], name: str = METRICS) -> None:
    """Appends one JSON line to WORKDIR/metrics.jsonl (or WORKDIR/`name`)."""
    with open(os.path.join(workdir, name), "a") as f:
        f.write(json.dumps(dict(record)) + "\n")


# --- Checkpoints --------------------------------------------------------------------------------


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """True when no floating-point leaf of `tree` holds NaN or an infinity."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


@functools.cache
def _write_each_array_once() -> None:
    """On CPU in one process, Orbax writes each replicated array from one replica. Its default there (and
    on TPU) splits each write among the replicas, which on a CPU share one memory, so the split only adds
    work: with 8 host devices, a 12-step run saving 7 times took 66 s instead of 41 s (NOTES.md)."""
    if jax.default_backend() == "cpu" and jax.process_count() == 1:  # across processes, the writes stay shared
        handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
        absl_logger = logging.getLogger("absl")  # where Orbax warns of the override, on stderr
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)
        try:
            ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
        finally:
            absl_logger.setLevel(level)


def _manager(directory: str, prefix: str, **options: Any) -> ocp.CheckpointManager:
    # Each manager gets its own barrier names: both save the same step at an evaluation, and across
    # processes two asynchronous saves under one name collide ("barrier ... is already ongoing").
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            create=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix),
            **options,
        ),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )


_SPACE_MARGIN_BYTES = 1 << 20  # Orbax's metadata files beside the arrays


class Checkpoints:
    """The latest checkpoints (keep N, asynchronous) and the best one by top-1, in the workdir."""

    def __init__(self, workdir: str, keep: int):
        self.workdir, self.disk_full = workdir, False
        _write_each_array_once()
        # Orbax's threads log through absl; its failed write tasks, collected at exit, through asyncio
        for logger in (logging.getLogger("absl"), logging.getLogger("asyncio")):
            if not any(isinstance(f, _HideDiskFull) for f in logger.filters):
                logger.addFilter(_HideDiskFull())
        self.latest = _manager(os.path.join(workdir, CHECKPOINTS), "latest", max_to_keep=keep)
        self.best = _manager(
            os.path.join(workdir, BEST), "best", max_to_keep=1, best_fn=lambda m: m["top1"], best_mode="max"
        )

    def save(self, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Saves `state` (asynchronously); a state with NaN or infinite values is refused."""
        step = int(state.step)
        if not bool(all_finite(state)):
            raise NonFiniteStateError(f"the state at step {step} holds NaN or infinite values")
        copies = (self.latest.latest_step() != step) + (metrics is not None)
        if copies:
            self._check_space(state, copies)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        with self._disk_full_reported():
            if self.latest.latest_step() != step:
                self.latest.save(step, args=args)
            if metrics is not None:
                self.best.save(step, args=args, metrics=metrics)

    def keep_before(self, step: int) -> int | None:
        """Moves the checkpoints of `step` and later to WORKDIR/damaged/ (a diverged run's: their weights
        gave a NaN loss) once the saves in flight are done; returns the newest step kept, if any."""
        self.wait()
        bad = [s for s in self.latest.all_steps() if s >= step]
        if bad:
            self._move_aside(bad)
        return self.latest.latest_step()

    def restore(self, abstract_state: Any, meta: dict) -> Any | None:
        """The newest checkpoint that restores and is finite, None if there is none.

        Newer ones that fail are reported and moved to WORKDIR/damaged/; if every checkpoint fails,
        nothing is moved and the error lists why (the run is not silently started over).
        """

        def read(step: int) -> Any:
            found = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            _check_same_run(self.workdir, found, meta)
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            return _finite(self.latest.restore(step, args=args)["state"])

        with _quiet_failed_reads():
            state, skipped = _restore_newest(sorted(self.latest.all_steps(), reverse=True), read)
        if skipped and state is None:
            listing = "; ".join(f"step {s}: {why}" for s, why in skipped)
            raise InvalidInputError(
                f"no checkpoint in {self.workdir}/{CHECKPOINTS} can be restored ({listing}): "
                "move the directory away to start over, or use another --workdir"
            )
        for step, why in skipped:
            print(f"warning: skipped checkpoint step {step} ({why}); moved to {DAMAGED}/", file=sys.stderr, flush=True)
        if skipped:
            self._move_aside([step for step, _ in skipped])
        return state

    def _move_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            target = os.path.join(self.workdir, DAMAGED)
            os.makedirs(target, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                source = os.path.join(self.workdir, CHECKPOINTS, str(step))
                if os.path.exists(source):
                    shutil.move(source, os.path.join(target, f"{CHECKPOINTS}-{step}-{stamp}"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("res2net_jax_damaged_checkpoints_moved")
        self.latest.reload()

    def wait(self) -> None:
        with self._disk_full_reported():
            self.latest.wait_until_finished()
            self.best.wait_until_finished()

    def close(self) -> None:
        if self.disk_full:  # writers that cannot finish: closing would wait on them and print their errors
            return
        with self._disk_full_reported():
            self.latest.close()
            self.best.close()

    def _check_space(self, state: Any, copies: int) -> None:
        """Refuses a save that the disk has no room for, before writing: a disk that fills during the
        write is reported too (`_disk_full_reported`), but TensorStore's writes still in flight then
        print tracebacks of their own (up to hundreds of lines) that no Python hook can catch."""
        needed = copies * sum(leaf.nbytes for leaf in jax.tree.leaves(state) if hasattr(leaf, "nbytes"))
        free = shutil.disk_usage(self.workdir).free
        if free < needed + _SPACE_MARGIN_BYTES:
            raise self._disk_full(f"{free / 2**20:.1f} MB free, a checkpoint needs about {needed / 2**20:.1f} MB")

    def _disk_full(self, detail: str) -> DiskFullError:
        """The one line for a full disk: `detail`, and the newest complete checkpoint, which a rerun resumes."""
        directory = os.path.join(self.workdir, CHECKPOINTS)
        done = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []
        kept = f"step {done[-1]}, the newest complete checkpoint, is kept" if done else "none was completed"
        return DiskFullError(f"no room on the disk holding {self.workdir} ({detail}): a checkpoint could not be "
                             f"written ({kept}); free some space there and rerun the same command, which resumes "
                             "from the newest complete checkpoint")  # fmt: skip

    @contextlib.contextmanager
    def _disk_full_reported(self) -> Iterator[None]:
        """A full disk while saving, found here or when the asynchronous save ends: one line naming the
        disk and the newest complete checkpoint, which a rerun resumes from."""
        try:
            yield
        except Exception as err:
            if not _is_disk_full(err):
                raise
            self.disk_full = True
            raise self._disk_full("no space left on device") from None


@contextlib.contextmanager
def _quiet_failed_reads() -> Iterator[None]:
    """While restoring a damaged checkpoint fails, Orbax's other pending reads fail too and print
    tracebacks from background coroutines and threads; the one reason reported is enough."""
    hooks = sys.unraisablehook, threading.excepthook
    sys.unraisablehook, threading.excepthook = (lambda *_: None), (lambda *_: None)
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.disabled = True  # "Future exception was never retrieved"
    try:
        yield
    finally:
        gc.collect()  # the failed reads' coroutines report when collected: now, while quiet
        sys.unraisablehook, threading.excepthook = hooks
        asyncio_log.disabled = False


class _NotFinite(Exception):
    """A checkpoint that restored but holds NaN or infinite values."""


def _finite(tree: Any) -> Any:
    """`tree`, if every value in it is finite."""
    if not bool(all_finite(tree)):
        raise _NotFinite
    return tree


def _restore_newest(steps: list[int], read: Callable[[int], Any]) -> tuple[Any | None, list[tuple[int, str]]]:
    """What `read` returns for the first of `steps` (newest first) it reads, None if none, with the steps
    skipped before it and why. A UserError from `read` (another run's checkpoint, no EMA) is the user's
    to see and passes through; any other error, or `_NotFinite`, is a damaged checkpoint."""
    skipped: list[tuple[int, str]] = []
    for step in steps:
        try:
            return read(step), skipped
        except UserError:
            raise
        except _NotFinite:
            skipped.append((step, "it holds NaN or infinite values"))
        except Exception as err:  # orbax, tensorstore and json each raise their own types
            skipped.append((step, _reason(err)))
    return None, skipped


def _reason(err: BaseException) -> str:
    """The innermost cause of a failed restore, in at most about 200 characters."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def _check_same_run(workdir: str, found: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    differences = {k: (found.get(k), v) for k, v in meta.items() if found.get(k) != v}
    if differences:
        detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differences.items())
        raise InvalidInputError(
            f"{workdir} holds another run ({detail}): use a new --workdir, or its settings to resume it"
        )


# --- Reading a run: what every tool that takes weights accepts --------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """The checkpoints a path names inside a run: its directory, the run's root, and a step or None
    (the newest that restores)."""

    root: str
    directory: str
    step: int | None


def locate(path: str | os.PathLike) -> Source | None:
    """The run and checkpoints `path` names: WORKDIR (its latest checkpoints), WORKDIR/best,
    WORKDIR/checkpoints, one step of either (WORKDIR/best/N) or that step's state (WORKDIR/best/N/state);
    None for a path outside a run."""
    path = os.path.abspath(os.fspath(path)).rstrip(os.sep)
    if os.path.basename(path) == "state":
        path = os.path.dirname(path)
    parent, name = os.path.split(path)
    if name.isdigit() and os.path.basename(parent) in (CHECKPOINTS, BEST) and os.path.isdir(path):
        return Source(os.path.dirname(parent), parent, int(name))
    if name in (CHECKPOINTS, BEST) and os.path.isdir(path):
        return Source(parent, path, None)
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        return Source(path, os.path.join(path, CHECKPOINTS), None)
    return None


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a run's files say about its model, so that no tool has to be told again."""

    model: str
    model_overrides: dict[str, Any]
    num_classes: int
    class_names: list[str] | None
    eval_size_and_crop: tuple[int, float] | None  # image_size and crop_pct; None without WORKDIR/config.json


def _newest_first(source: Source, manager: ocp.CheckpointManager) -> list[int]:
    """The step `source` names, else every step of its directory, newest first; none is one line."""
    if source.step is not None:
        return [source.step]
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:  # WORKDIR/best of a run stopped before its first evaluation, say
        raise MissingFileError(f"{source.directory} holds no checkpoint yet: train further, or name another one")
    return steps


def describe(source: Source) -> RunInfo:
    """The model, architecture overrides, class count, class names and evaluation size and crop of the
    run `source` is in, from the metadata its checkpoints carry, WORKDIR/classes.txt and config.json."""
    manager = _manager(source.directory, "read")
    try:
        meta, _ = _restore_newest(
            _newest_first(source, manager),
            lambda step: manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"],
        )
    finally:
        manager.close()
    if meta is None:
        raise InvalidInputError(f"{source.directory} holds no readable checkpoint")
    names_path = os.path.join(source.root, CLASSES)
    names = None
    if os.path.exists(names_path):
        with open(names_path) as f:
            names = f.read().splitlines()
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("model_overrides", {}).items()}
    settings = read_settings(source.root)
    size_and_crop = (settings["image_size"], settings["crop_pct"]) if settings is not None else None
    return RunInfo(meta["model"], overrides, int(meta["num_classes"]), names, size_and_crop)


def write_class_names(workdir: str, names: list[str]) -> None:
    """Records the dataset's class names (one a line, by index) for predict."""
    _write_text_atomically(os.path.join(workdir, CLASSES), "".join(f"{name}\n" for name in names))


def read_variables(path: str | os.PathLike, ema: bool = False) -> dict[str, Any]:
    """{'params', 'batch_stats'} (or the EMA's, with `ema`) of the checkpoint `path` names (see `locate`):
    a named step, else the newest that restores and is finite. On the host CPU; nothing is moved."""
    source = locate(path)
    if source is None:
        raise InvalidInputError(f"{path} is not a training workdir or one of its checkpoints")
    manager = _manager(source.directory, "read")
    on_host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    keys = ("ema_params", "ema_batch_stats") if ema else ("params", "batch_stats")

    def read(step: int) -> dict[str, Any]:
        shapes = manager.item_metadata(step)["state"]
        if not shapes.get(keys[0]):
            raise InvalidInputError(f"{path} holds no EMA of the weights: its run had ema_decay 0")
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_host), shapes)
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        return _finite({"params": state[keys[0]], "batch_stats": state[keys[1]]})

    with _quiet_failed_reads():
        try:
            variables, skipped = _restore_newest(_newest_first(source, manager), read)
        finally:
            manager.close()
    reasons = [f"step {step}: {why}" for step, why in skipped]
    if variables is None:
        detail = f" ({'; '.join(reasons)})" if reasons else ""
        raise InvalidInputError(f"{path} has no checkpoint that can be restored{detail}")
    for reason in reasons:
        print(f"warning: skipped checkpoint {reason}", file=sys.stderr, flush=True)
    return variables
