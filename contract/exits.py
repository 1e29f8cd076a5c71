"""The exit codes of every olivepress command, and the error types that carry them.

An error a user can act on is one of these exceptions: click prints its message (one paragraph naming the problem
and the fix) and exits with its code, with no traceback. The README and ``olivepress --help`` show ``TABLE``.
"""

from __future__ import annotations

from enum import IntEnum

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
