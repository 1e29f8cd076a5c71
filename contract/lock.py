"""One writer per home: an exclusive ``flock`` on ``<home>/.olivepress.lock``.

The kernel drops the lock with the last process holding it, so a killed writer leaves no stale lock. It works for
every process that sees the same file through one kernel: the host and the containers over a shared volume.
Readers (status, serve, a stage that skips) never take it.

A writer hands its lock to the processes it starts (``olivepress run`` -> each stage): the open lock file is
passed as an inherited file descriptor named in ``OLIVEPRESS_LOCK_FD``; a process that finds that descriptor
open on the same lock file already holds the lock through it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import click

from contract.exits import BadInput, VolumeBusy

LOCK_FILE = ".olivepress.lock"
FD_ENV = "OLIVEPRESS_LOCK_FD"
WAIT_ENV = "OLIVEPRESS_WAIT"
# A reader's momentary shared lock (``holder``) is not a writer: try this long before calling the home busy.
_BUSY_AFTER_S = 0.5


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), path.stat()
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def inherited_fd(root: Path) -> int | None:
    """The descriptor through which this process already holds the home's lock, if it does."""
    value = os.environ.get(FD_ENV, "")
    if value.isdigit() and _same_file(int(value), root / LOCK_FILE):
        return int(value)
    return None


def holder(root: Path) -> dict | None:
    """Who is writing to ``root`` now ({pid, command, started}), or None when nobody is."""
    path = root / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                return {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe(info: dict | None) -> str:
    if not info:
        return "another olivepress command"
    return f"`{info.get('command', 'olivepress')}` (PID {info.get('pid', '?')}, since {info.get('started', '?')})"


@contextmanager
def writer(root: Path, wait: bool | None = None) -> Iterator[bool]:
    """Hold the home's writer lock for the block; yields True when this call took it (False: already held here).

    A home that another process is writing to raises VolumeBusy (exit 5) naming that process, or, with ``wait``
    (default: the OLIVEPRESS_WAIT variable), waits for it.
    """
    if inherited_fd(root) is not None:
        yield False
        return
    wait = bool(os.environ.get(WAIT_ENV)) if wait is None else wait
    path = root / LOCK_FILE
    fd = _acquire(root, path, wait)
    try:
        info = {
            "pid": os.getpid(),
            "command": shlex.join(["olivepress", *sys.argv[1:]]),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.set_inheritable(fd, True)
        os.environ[FD_ENV] = str(fd)
        try:
            yield True
        finally:
            os.environ.pop(FD_ENV, None)
            path.unlink(missing_ok=True)  # while still locked: the next writer creates a fresh file
    finally:
        os.close(fd)  # closing the last descriptor of the open file releases the lock


def _acquire(root: Path, path: Path, wait: bool) -> int:
    """An open, exclusively locked descriptor of the lock file that is still the one at ``path`` (a writer that
    finishes unlinks its file, so a waiter may lock an unlinked one: it then tries the new file)."""
    deadline = time.monotonic() + _BUSY_AFTER_S
    while True:
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise unwritable(root, error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise VolumeBusy(
                    f"{root} is being written by {_describe(holder(root))}; wait for it to finish, or pass "
                    f"--wait (or set {WAIT_ENV}=1) to wait for it"
                ) from None
            time.sleep(0.05)
            continue
        if _same_file(fd, path):
            return fd
        os.close(fd)


class HomeNotWritable(BadInput):
    """The home cannot be written to: read-only, not ours, or under a file."""


def unwritable(root: Path, error: OSError) -> HomeNotWritable:
    """The message for a home that cannot be written to."""
    if error.errno == errno.ENOTDIR or (root.exists() and not root.is_dir()):
        return HomeNotWritable(
            f"--home {root} is not a folder (it or a folder above it is a file); point --home at a folder"
        )
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return HomeNotWritable(
            f"--home {root} is not writable ({os.strerror(error.errno)}); make it writable, or point --home (or "
            f"OLIVEPRESS_HOME) at a writable copy: reading it (status, serve, infer of a finished volume) needs no "
            f"write access"
        )
    return HomeNotWritable(f"cannot write to --home {root}: {os.strerror(error.errno or 0)}")


def wait_option(func: Callable) -> Callable:
    """``--wait`` (env OLIVEPRESS_WAIT), for every command that writes to the home: wait for another writer."""

    def remember(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        if value:
            os.environ[WAIT_ENV] = "1"  # read by lock.writer, here and in the processes this one starts
        return value

    return click.option(
        "--wait",
        is_flag=True,
        envvar=WAIT_ENV,
        expose_value=False,
        callback=remember,
        help="If another olivepress command is writing to the home, wait for it instead of stopping (exit 5).",
    )(func)
