"""Where the test suite's time goes: the CPU seconds of every Python process a pytest run starts, and how
many of them JAX spent compiling, by test.

    python experiments/suite_profile.py --out=experiments/results/suite_profile_CARD.json \\
        -- -n 2 --dist loadfile -q

Runs pytest with the arguments after `--` with a `sitecustomize` module on PYTHONPATH, which every Python
process of the run (pytest's workers, main.py runs, notebook kernels, scripts) imports at start. It
listens to JAX's compilation events (tracing, lowering to MLIR, XLA's compilation, persistent-cache reads),
each counted for the test running at that moment (PYTEST_CURRENT_TEST, which the processes a test starts
inherit), and at exit appends the process's CPU seconds (user + system). A process killed
(kill -9), or started with an environment of its own (the experiments' scripts set PYTHONPATH), is not
seen; the run's CPU seconds (`run_cpu_s`: every process of the run, seen or not, from the operating
system's count of finished children) are the whole. Compiling is one thread's work, so its seconds against
the run's CPU seconds are its share.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import report
from absl import app, flags

from res2net_jax import cli

_OUT = flags.DEFINE_string("out", None, "The JSON file to write (never overwritten).", required=True)
PACKAGES = ("jax", "jaxlib", "flax", "tensorflow-cpu", "torch", "pytest", "pytest-xdist")
COMPILING = {  # JAX's event name -> the part of compiling it times
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "xla_s",
    "/jax/compilation_cache/cache_retrieval_time_sec": "cache_read_s",
}

# Imported by every Python process of the run: JAX's compilation events by test, then one JSON line at exit.
PROBE = f"""
import atexit, collections, importlib.abc, importlib.machinery, json, os, resource, sys

_EVENTS = {json.dumps(COMPILING)}
_SECONDS = collections.defaultdict(float)


def _listen(event, seconds, **kwargs):
    if event in _EVENTS:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        _SECONDS[test + "\\0" + _EVENTS[event]] += seconds


class _Finder(importlib.abc.MetaPathFinder):
    # Registers the listener as soon as jax._src.monitoring is loaded, whoever imports JAX.
    def find_spec(self, name, path, target=None):
        if name != "jax._src.monitoring":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.register_event_duration_secs_listener(_listen)

        spec.loader.exec_module = exec_module
        return spec


def _record():
    log = os.environ.get("SUITE_PROFILE_LOG")  # absent where a test built the environment anew
    if not log:
        return
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {{
        "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0], "pytest": "_pytest" in sys.modules,
        "cpu_s": usage.ru_utime + usage.ru_stime, "compiling": dict(_SECONDS),
    }}
    with open(log, "a") as f:
        f.write(json.dumps(record) + "\\n")


sys.meta_path.insert(0, _Finder())
atexit.register(_record)
"""


def summarise(records: list[dict]) -> dict:
    """Totals and per-test figures from the processes' records: CPU seconds of the processes seen, compiling
    seconds by part, and for each test its compiling seconds and the processes it started."""
    tests: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    totals: dict[str, float] = collections.defaultdict(float)
    for record in records:
        totals["cpu_s"] += record["cpu_s"]
        totals["processes"] += 1
        if not record["pytest"]:  # a process a test started: its seconds are that test's
            tests[record["test"]]["processes"] += 1
            tests[record["test"]]["process_cpu_s"] += record["cpu_s"]
        for key, seconds in record["compiling"].items():
            test, part = key.split("\0")
            tests[test][part] += seconds
            tests[test]["compiling_s"] += seconds
            totals[part] += seconds
            totals["compiling_s"] += seconds
    ranked = sorted(tests.items(), key=lambda item: -item[1]["compiling_s"])
    return {"totals": dict(totals), "tests": {test: dict(figures) for test, figures in ranked}}


def main(argv: list[str]) -> None:
    report.refuse_existing(_OUT.value)
    with tempfile.TemporaryDirectory(prefix="suite_profile_") as directory:
        with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
            f.write(PROBE)
        log = os.path.join(directory, "processes.jsonl")
        path = os.pathsep.join(p for p in (directory, os.environ.get("PYTHONPATH")) if p)
        start, before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run([sys.executable, "-m", "pytest", *argv[1:]],
                              env=dict(os.environ, PYTHONPATH=path, SUITE_PROFILE_LOG=log))  # fmt: skip
        wall, after = time.time() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(log) as f:
            records = [json.loads(line) for line in f]
    summary = summarise(records)
    totals = summary["totals"]
    totals["run_cpu_s"] = sum(getattr(after, f) - getattr(before, f) for f in ("ru_utime", "ru_stime"))
    compiling, seen = totals.get("compiling_s", 0.0), totals["processes"]
    print(f"pytest exited {done.returncode} after {wall:.0f} s: {totals['run_cpu_s']:.0f} CPU seconds, "
          f"{compiling:.0f} of them compiling ({seen:.0f} Python processes seen)", flush=True)  # fmt: skip
    report.write(_OUT.value, PACKAGES, {"pytest_args": argv[1:]}, returncode=done.returncode, wall_s=wall, **summary)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
