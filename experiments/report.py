"""What every result file in experiments/results/ records beside its figures (the card, date and
versions), and the timing rule the scripts share.

The scripts here import it as a sibling module (Python puts a script's own directory on sys.path).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

from absl import app


def seconds_per_call(fn: Callable[[], Any], sync: Callable[[Any], Any], repeats: int) -> float:
    """Mean seconds per call of `fn` over `repeats` back-to-back calls, after one untimed call (compiling,
    warming caches); `sync` waits for a call's result, so asynchronous dispatch is timed whole."""
    sync(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync(out)
    return (time.perf_counter() - start) / repeats


def card() -> str:
    """The GPU's name, else the CPU's model and core count."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, check=True).stdout.split("\n")  # fmt: skip
        return names[0].strip()
    except (OSError, subprocess.CalledProcessError):
        return f"CPU: {_cpu_model()}, {os.cpu_count()} cores"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Python's and each installed distribution's version; 'not installed' for the others."""
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def refuse_existing(path: str) -> None:
    """Results are never overwritten: stop (a usage error of the absl scripts here) if `path` exists."""
    if os.path.exists(path):
        raise app.UsageError(f"{path} exists: choose a new --out, or delete it first")


def write(path: str, packages: tuple[str, ...], settings: dict[str, Any], *, update: bool = False,
          **figures: Any) -> None:  # fmt: skip
    """One result file: card, date, versions and settings, then the figures (e.g. models=...).

    A new file is never written over another. `update=True` rewrites the file this run already wrote
    (whole, atomically), so that figures measured so far survive an interrupted run.
    """
    if not update:
        refuse_existing(path)
    body = {"card": card(), "date": datetime.date.today().isoformat(), "versions": versions(packages),
            "settings": settings, **figures}  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump(body, f, indent=1)
    os.replace(f"{path}.tmp", path)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":  # a module the scripts import: run, it says what it is
    print(__doc__)
