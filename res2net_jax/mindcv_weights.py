"""MindCV's published ImageNet weights, fetched by MindCV's names.

MindCV publishes MindSpore checkpoints of res2net50, res2net101, res2net50_v1b and res2net101_v1b
(`registry.MINDCV_WEIGHTS`) on its own server, not on the Hugging Face hub. `fetch(name)` returns a
local copy: MindCV's own download cache (`~/.mindspore/models/`, where MindCV's `load_pretrained`
puts it) if the file is there, else this package's cache, downloading into it once.

- `RES2NET_MINDCV_CACHE`: this package's cache directory (default `$XDG_CACHE_HOME/res2net_jax/mindcv`,
  i.e. `~/.cache/res2net_jax/mindcv`).
- `RES2NET_MINDCV_ENDPOINT`: replaces `https://download.mindspore.cn` in the URLs (a mirror), as
  huggingface_hub's `HF_ENDPOINT` does for the hub.
- `RES2NET_MINDCV_TIMEOUT`: seconds to wait on a connection that sends nothing (default 60).

A download is written under `NAME.partial`, its length checked against the server's and its content
read as a MindSpore checkpoint of that network, and only then renamed to `NAME`: a torn, killed or
wrong download never stays under the final name, and the next call starts it over. A lock on the
cache directory keeps two processes from downloading the same file at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import http.client
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

from absl import logging

from res2net_jax import convert, ms_checkpoint
from res2net_jax.errors import InvalidInputError, MissingFileError, UserError
from res2net_jax.registry import MINDCV_WEIGHTS

ENDPOINT = "https://download.mindspore.cn"
ENDPOINT_ENV = "RES2NET_MINDCV_ENDPOINT"
CACHE_ENV = "RES2NET_MINDCV_CACHE"
TIMEOUT_ENV = "RES2NET_MINDCV_TIMEOUT"
_CHUNK = 1 << 20


def url(name: str) -> str:
    """Where MindCV's checkpoint for `name` is downloaded from (RES2NET_MINDCV_ENDPOINT applied)."""
    given = os.environ.get(ENDPOINT_ENV, ENDPOINT)
    endpoint = given.rstrip("/")
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise InvalidInputError(f"{ENDPOINT_ENV}={given!r} is not an http:// or https:// address: set it to a "
                                f"mirror of {ENDPOINT} (scheme, host and optional path), or unset it")  # fmt: skip
    return endpoint + MINDCV_WEIGHTS[name][0].removeprefix(ENDPOINT)


def _file_name(name: str) -> str:
    return os.path.basename(MINDCV_WEIGHTS[name][0])


def mindcv_cache_path(name: str) -> str:
    """Where MindCV's own `load_pretrained` keeps the file (read, never written, here)."""
    return os.path.join(os.path.expanduser("~"), ".mindspore", "models", _file_name(name))


def cache_path(name: str) -> str:
    """Where this package keeps the file: RES2NET_MINDCV_CACHE, else the user cache directory."""
    directory = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "res2net_jax", "mindcv"
    )
    return os.path.join(os.path.expanduser(directory), _file_name(name))


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV, "60")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise InvalidInputError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds > 0")
    return seconds


def fetch(name: str) -> str:
    """The local path of MindCV's checkpoint for `name`: MindCV's cache, this package's, or downloaded
    into this package's. Every failure is one line naming the URL and where a copy is picked up."""
    theirs, ours = mindcv_cache_path(name), cache_path(name)
    if os.path.isfile(theirs):  # MindCV downloads with no length or content check: checked here
        try:
            _check(theirs, name)
        except InvalidInputError as err:
            raise InvalidInputError(f"{theirs} (MindCV's download cache) is not MindCV's {name} checkpoint ({err}): "
                                    "delete it, and it is downloaded again") from None  # fmt: skip
        return theirs
    if os.path.isfile(ours):  # only ever renamed into place once checked
        return ours
    address, target, timeout = url(name), ours, _timeout()  # the settings refused before any writing
    with _locked(os.path.dirname(target)):
        if not os.path.isfile(target):  # another process may have finished it meanwhile
            _download(name, address, target, timeout)
    return target


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """An exclusive lock on the cache directory (created if need be), held while downloading."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
    except OSError as err:
        raise InvalidInputError(f"cannot use {directory} as the cache of MindCV's weights ({err.strerror}): set "
                                f"{CACHE_ENV} to a writable directory") from None  # fmt: skip
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _download(name: str, address: str, target: str, timeout: float) -> None:
    partial = target + ".partial"
    copy_hint = (f"download {address} where there is network and copy it to {target} (or to MindCV's own cache, "
                 f"{mindcv_cache_path(name)}), where it is picked up")  # fmt: skip
    logging.info("downloading MindCV's %s weights from %s to %s", name, address, target)
    try:
        with urllib.request.urlopen(address, timeout=timeout) as response, open(partial, "wb") as out:
            expected = int(response.headers.get("Content-Length") or 0) or None
            received = _copy(response, out, expected, os.path.basename(target))
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and received != expected:
            raise MissingFileError(f"the download of {address} stopped after {received:,} of {expected:,} bytes: "
                                   "run again to download it anew")  # fmt: skip
        try:
            _check(partial, name)
        except InvalidInputError as err:
            raise InvalidInputError(f"{address} did not serve MindCV's {name} checkpoint ({err}): check "
                                    f"{ENDPOINT_ENV}, or run again if the file was changing") from None  # fmt: skip
        os.replace(partial, target)
    except UserError:
        _remove(partial)
        raise
    except urllib.error.HTTPError as err:  # a subclass of URLError and OSError: first
        _remove(partial)
        raise MissingFileError(f"{address} answered HTTP {err.code} ({err.reason}) for MindCV's {name} weights: "
                               f"check {ENDPOINT_ENV}, or {copy_hint}") from None  # fmt: skip
    except TimeoutError:
        _remove(partial)
        raise MissingFileError(f"{address} sent nothing for {timeout:g} s ({TIMEOUT_ENV}): run again later, or "
                               f"{copy_hint}") from None  # fmt: skip
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError) as err:
        _remove(partial)
        reason = getattr(err, "reason", None) or err
        raise MissingFileError(f"cannot download MindCV's {name} weights from {address} ({reason}; offline?): "
                               f"{copy_hint}") from None  # fmt: skip
    except OSError as err:  # writing the cache: a full disk, a read-only file system
        _remove(partial)
        fix = "free some space there" if err.errno == errno.ENOSPC else "make it writable"
        raise InvalidInputError(f"cannot write {partial} ({err.strerror}): {fix}, or set {CACHE_ENV} to another "
                                "directory") from None  # fmt: skip


def _copy(response: http.client.HTTPResponse, out: object, expected: int | None, label: str) -> int:
    """Copies the body to `out`, with a progress line on a terminal; returns the bytes received."""
    show = sys.stderr.isatty()

    def progress(end: str = "") -> None:
        share = f" {100 * received / expected:3.0f}%" if expected else ""
        total = f" / {expected / 1e6:.1f}" if expected else ""
        print(f"\rdownloading {label}: {received / 1e6:.1f}{total} MB{share}", end=end, file=sys.stderr, flush=True)

    received, shown = 0, 0.0
    while chunk := response.read(_CHUNK):
        out.write(chunk)  # type: ignore[attr-defined]
        received += len(chunk)
        if show and time.monotonic() - shown > 0.2:
            shown = time.monotonic()
            progress()
    if show:
        progress(end="\n")
    return received


def _check(path: str, name: str) -> None:
    """Refuses a file that is not a complete MindSpore checkpoint of `name`'s network."""
    convert.from_torch(convert.mindcv_to_timm(ms_checkpoint.read(path)), name)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
