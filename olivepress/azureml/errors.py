"""What the Azure SDK's failures mean to a user: one message and an exit code from ``contract.exits``, no traceback.

Every call into the service runs inside ``sdk_errors``: a refused identity is exit 3 with the role to ask for, a name
that does not exist or a spec the SDK rejects before sending it is bad input (exit 2), anything else is a failed
transfer (exit 1) with the SDK's short reason (``--verbose`` adds its whole error). ``with_retries`` retries a step
that failed transiently; ``quiet_sdk_loggers`` and ``sdk_console`` keep the SDK's own console output out of the way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from typing import TypeVar

import click

from contract.exits import BadInput, Exit, NoAzureCredentials

log = logging.getLogger("olivepress")

TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
T = TypeVar("T")


class TransferFailed(click.ClickException):
    """A call to Azure ML, an upload or a download failed after its retries."""

    exit_code = Exit.FAILED


def status_code(error: BaseException) -> int | None:
    return getattr(error, "status_code", None)


def short_reason(error: BaseException) -> str:
    """The first line of the SDK's message: the reason, without the request ids and the service's JSON."""
    text = getattr(error, "message", None) or str(error) or type(error).__name__
    return text.strip().splitlines()[0][:300]


def _validation_lines(error: BaseException) -> str | None:
    """The SDK's client-side validation result as one line per error, or None for any other error.

    The SDK raises it as a JSON text of ``{"errors": [{path, message}]}``, in an exception class that depends on
    the entity being validated.
    """
    text = str(getattr(error, "message", None) or error).strip()
    try:
        errors = json.loads(text)["errors"] if text.startswith("{") else None
        return "\n".join(f"  {e['path']}: {str(e['message']).splitlines()[0]}" for e in errors) if errors else None
    except (ValueError, KeyError, TypeError):
        return None


def sdk_error(
    error: Exception,
    target: object,
    verbose: bool,
    *,
    failed: str,
    not_found: str | None = None,
    refused: str | None = None,
    afterwards: str = "",
) -> click.ClickException:
    """The error to show for ``error``, raised by a call to ``target`` (a workspace or registry).

    ``failed`` starts the message of a failed transfer (``"push to <target> failed"``) and ``afterwards`` ends it
    (what state things are in); ``not_found`` is the whole message when the service says the thing does not exist
    (without it, that is a failed transfer too); ``refused`` starts the list of the SDK's validation errors.
    """
    from azure.ai.ml.exceptions import ValidationException
    from azure.core.exceptions import ResourceNotFoundError

    code = status_code(error)
    if code in (401, 403):
        return NoAzureCredentials(
            f"signed in, but {target} refused the request ({code}: {short_reason(error)}). The identity needs a "
            f"role such as 'AzureML Data Scientist' on the workspace, or the workspace name is wrong."
        )
    if not_found is not None and isinstance(error, ResourceNotFoundError):
        return BadInput(not_found)
    refused = refused or f"{target} refused the request, nothing was changed"
    lines = _validation_lines(error)
    if lines:
        return BadInput(f"{refused}:\n{lines}")
    if isinstance(error, ValidationException):
        return BadInput(f"{refused}: {short_reason(error)}")
    detail = f"\n{error}" if verbose else " (--verbose shows the SDK's error)"
    return TransferFailed(f"{failed}: {short_reason(error)}{detail}" + (f"\n{afterwards}" if afterwards else ""))


@contextmanager
def sdk_errors(
    target: object,
    verbose: bool,
    *,
    failed: str,
    not_found: str | None = None,
    refused: str | None = None,
    afterwards: str = "",
) -> Iterator[None]:
    """Calls to the service inside the block fail with ``sdk_error``'s message; our own errors pass unchanged."""
    try:
        yield
    except click.ClickException:
        raise
    except Exception as error:
        raise sdk_error(
            error, target, verbose, failed=failed, not_found=not_found, refused=refused, afterwards=afterwards
        ) from None


def is_transient(error: BaseException) -> bool:
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(error, (ServiceRequestError, ServiceResponseError, ConnectionError, TimeoutError)):
        return True
    return isinstance(error, HttpResponseError) and status_code(error) in TRANSIENT_STATUS


def with_retries(what: str, call: Callable[[], T], attempts: int, backoff_s: float) -> T:
    """azure-core already retries each request; this retries the whole step when a request runs out of tries.

    Blob uploads are content-addressed, so a retried upload sends only what is not there yet.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as e:
            if attempt == attempts or not is_transient(e):
                raise
            wait = backoff_s * 2 ** (attempt - 1)
            log.warning("%s: %s; trying again in %.0f s (%d/%d)", what, short_reason(e), wait, attempt, attempts - 1)
            time.sleep(wait)
    raise AssertionError("unreachable")


def quiet_sdk_loggers(verbose: bool) -> None:
    """The SDK's own log lines only with --verbose: our messages already say what they would."""
    # DefaultAzureCredential logs its whole failure at WARNING and then raises the same text: the exception is
    # the one copy we show (with --verbose).
    logging.getLogger("azure").setLevel(logging.INFO if verbose else logging.CRITICAL)
    logging.getLogger("azure.identity").setLevel(logging.CRITICAL)
    # Request and response headers at INFO: too much even for --verbose.
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)
    # "This is an experimental class", once per schema class a pipeline job loads.
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.WARNING if verbose else logging.ERROR)
    # Some azure-ai-ml modules give themselves an INFO handler on stderr at import ("Downloading the model ...").
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("azure.ai.ml") and isinstance(logger, logging.Logger) and not logger.propagate:
            logger.setLevel(logging.INFO if verbose else logging.WARNING)


@contextmanager
def sdk_console(verbose: bool) -> Iterator[None]:
    """The SDK prints a colour reset after each upload; shown only where its progress bar is (a terminal)."""
    if verbose or sys.stderr.isatty():
        yield
        return
    with open(os.devnull, "w") as sink, redirect_stderr(sink):
        yield
