"""Output paths: never overwrite, never leave a partial file under the final name.

Every writer in the package goes through `atomic_output`: the output is written under a hidden
temporary directory beside the final path and renamed into place only when complete, so a full
disk or a crash leaves at most a `.NAME.partial-*` directory, never a truncated NAME that blocks
the next export or passes for a good one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from res2net_jax.errors import InvalidInputError, OutputExistsError


def new_output_path(path: str | os.PathLike) -> str:
    """`path` as a string, refused if something is there already: writers never overwrite work."""
    path = os.fspath(path)
    if os.path.lexists(path):
        raise OutputExistsError(f"{path} exists: choose a new output path, or delete it first")
    return path


def writable_output_path(path: str | os.PathLike) -> str:
    """`new_output_path`, also refused when its directory cannot be written (the nearest existing one is
    checked: writing creates the others), so that a command fails before its work, not after."""
    path = new_output_path(path)
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"cannot write {path}: {parent} is not a writable directory; choose another path")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path to write a file or directory to; renames it to `path` on success.

    The result gets the modes a plain `open` or `mkdir` would give (0644 / 0755 under the usual
    umask), not the 0600 / 0700 of temporary files.
    """
    path = os.path.abspath(new_output_path(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    staged = os.path.join(scratch, name)
    try:
        yield staged
        if not os.path.lexists(staged):
            raise RuntimeError(f"nothing was written for {path}")
        mode = (0o777 if os.path.isdir(staged) else 0o666) & ~_umask()
        os.chmod(staged, mode)
        new_output_path(path)  # something may have appeared there meanwhile
        if os.path.isdir(staged):
            os.rename(staged, path)  # fails rather than replace a non-empty directory
        else:
            os.link(staged, path)  # fails rather than replace a file
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
