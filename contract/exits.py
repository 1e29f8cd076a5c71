"""The exit codes of every olivepress command, and the error types that carry them.

An error a user can act on is one of these exceptions: click prints its message (one paragraph naming the problem
and the fix) and exits with its code, with no traceback. The README and ``olivepress --help`` show ``TABLE``.
"""

from __future__ import annotations

import errno
import logging
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path

import click


class Exit(IntEnum):
    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    NO_AZURE_CREDENTIALS = 3
    NO_DOCKER = 4
    VOLUME_BUSY = 5
    INTERRUPTED = 130


TABLE: dict[Exit, str] = {
    Exit.OK: "done (or nothing to do)",
    Exit.FAILED: "a stage, a transfer or olivepress itself failed; the message names the log with the details",
    Exit.BAD_INPUT: "bad input or usage: the message names the problem and the fix; nothing was changed",
    Exit.NO_AZURE_CREDENTIALS: "no usable Azure credentials, or the identity was refused (push, pull, azureml)",
    Exit.NO_DOCKER: "no Docker engine, or no compose / buildx CLI plugin (the docker verbs)",
    Exit.VOLUME_BUSY: "another olivepress command is writing to the same home",
    Exit.INTERRUPTED: "interrupted (Ctrl-C): nothing of the running stage was published",
}


def epilog() -> str:
    """The table as a --help epilog (click keeps the lines of a paragraph that starts with \\b)."""
    return "\b\nExit codes:\n" + "\n".join(f"  {int(code):<4}{meaning}" for code, meaning in TABLE.items())


def markdown() -> str:
    """The table as the README shows it."""
    rows = "\n".join(f"| {int(code)} | {meaning} |" for code, meaning in TABLE.items())
    return f"| code | meaning |\n| --- | --- |\n{rows}\n"


class BadInput(click.ClickException):
    """A problem the user can fix before anything runs: a bad file, option or order of stages."""

    exit_code = Exit.BAD_INPUT


class NoAzureCredentials(click.ClickException):
    exit_code = Exit.NO_AZURE_CREDENTIALS


class NoDocker(click.ClickException):
    exit_code = Exit.NO_DOCKER


class VolumeBusy(click.ClickException):
    exit_code = Exit.VOLUME_BUSY


# Set on an exception whose traceback is already in a log file: the path of that file.
LOGGED_TO = "olivepress_log"


@contextmanager
def reported(what: str, log_file: Path) -> Iterator[None]:
    """Run a command's body so that whatever escapes it ends as one message and a documented exit code.

    Our own errors pass through (click prints them). Ctrl-C exits 130. An unreadable file is bad input. Anything
    else is a failure whose traceback goes to ``log_file`` (kept there if the stage already wrote it), never to
    the terminal.
    """
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        click.echo(f"\n{what}: interrupted; nothing of it was published", err=True)
        raise click.exceptions.Exit(Exit.INTERRUPTED) from None
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.EACCES, errno.EISDIR, errno.ENOTDIR) and error.filename:
            raise BadInput(
                f"{what}: cannot read {error.filename} ({os.strerror(error.errno)}); check the path and its permissions"
            ) from None
        raise _failure(what, error, log_file) from None
    except Exception as error:
        raise _failure(what, error, log_file) from None


def _failure(what: str, error: BaseException, log_file: Path) -> click.ClickException:
    logged = getattr(error, LOGGED_TO, None)  # contract.volume.run_stage keeps a stage's traceback in its log
    if logged:
        where = f"the traceback is in {logged}"
    else:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with log_file.open("a") as f:
                f.write(f"{what} failed:\n{traceback.format_exc()}")
            where = f"the traceback is in {log_file}"
        except OSError:
            logging.getLogger("olivepress").exception("%s failed", what)
            where = "the traceback could not be written to a file"
    reason = (str(error).strip().splitlines() or [""])[0][:300]
    return click.ClickException(f"{what} failed: {type(error).__name__}: {reason} ({where})")
