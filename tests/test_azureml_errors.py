"""olivepress/azureml/errors.py: each kind of SDK failure becomes one message and its exit code, with no traceback.

The exceptions are the SDK's own classes, raised here directly: no service, no Azurite.
"""

from __future__ import annotations

import json

import click
import pytest
from azure.ai.ml.exceptions import JobException, ValidationException
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from click.testing import CliRunner

from contract.exits import BadInput, Exit, NoAzureCredentials
from olivepress.azureml import errors

TARGET = "azureml://subscriptions/s/resourcegroups/g/workspaces/w"
FAILED = f"push to {TARGET} failed"
AFTERWARDS = "Nothing was registered."


def http_error(cls: type[HttpResponseError], status: int | None, message: str) -> HttpResponseError:
    error = cls(message=message)
    error.status_code = status
    return error


def mapped(error: Exception, verbose: bool = False, **hints: str) -> click.ClickException:
    with pytest.raises(click.ClickException) as raised:
        with errors.sdk_errors(TARGET, verbose, failed=FAILED, afterwards=AFTERWARDS, **hints):
            raise error
    return raised.value


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("cls", [HttpResponseError, ClientAuthenticationError, ResourceNotFoundError])
def test_a_refused_identity_is_exit_3_with_the_role_to_ask_for(cls: type[HttpResponseError], status: int) -> None:
    error = mapped(http_error(cls, status, "(AuthorizationFailed) no access\nrequest id 1"), not_found="never")
    assert isinstance(error, NoAzureCredentials) and error.exit_code == Exit.NO_AZURE_CREDENTIALS == 3
    assert error.message.startswith(f"signed in, but {TARGET} refused the request ({status}: (AuthorizationFailed)")
    assert "'AzureML Data Scientist'" in error.message and "request id" not in error.message


def test_not_found_is_bad_input_with_the_callers_hint_and_a_failure_without_one() -> None:
    missing = http_error(ResourceNotFoundError, 404, "(UserError) model m:9 not found")
    error = mapped(missing, not_found="m:9 not found in the workspace: check the name")
    assert isinstance(error, BadInput) and error.exit_code == Exit.BAD_INPUT
    assert error.message == "m:9 not found in the workspace: check the name"

    error = mapped(missing)
    assert isinstance(error, errors.TransferFailed) and error.exit_code == Exit.FAILED
    assert error.message.startswith(f"{FAILED}: (UserError) model m:9 not found")


def test_the_sdks_validation_errors_are_bad_input_listing_each_field() -> None:
    result = {
        "result": "Failed",
        "errors": [
            {"path": "jobs.finetune.compute", "message": "(ResourceNotFound) compute cpu not found\nmore", "value": 1},
            {"path": "jobs.quantize.compute", "message": "(ResourceNotFound) compute cpu not found"},
        ],
    }
    # The SDK raises the validation result as JSON text, in an exception class that depends on the entity.
    error = mapped(JobException(json.dumps(result), "no pii"), refused=f"{TARGET} refused the job, nothing submitted")
    assert isinstance(error, BadInput) and error.exit_code == Exit.BAD_INPUT
    assert error.message == (
        f"{TARGET} refused the job, nothing submitted:\n"
        "  jobs.finetune.compute: (ResourceNotFound) compute cpu not found\n"
        "  jobs.quantize.compute: (ResourceNotFound) compute cpu not found"
    )

    error = mapped(ValidationException("the path must be a folder\ndetails", "no pii"))
    assert isinstance(error, BadInput)
    assert error.message == f"{TARGET} refused the request, nothing was changed: the path must be a folder"


@pytest.mark.parametrize(
    "sdk_error",
    [
        http_error(HttpResponseError, 400, "(BadRequest) the body is wrong\nContent: {...}"),
        http_error(HttpResponseError, 503, "(ServiceUnavailable) the body is wrong"),
        ServiceRequestError("the body is wrong: connection refused"),
        ServiceResponseError("the body is wrong: connection reset"),
        RuntimeError("the body is wrong"),
        JobException("the body is wrong, not JSON", "no pii"),
    ],
    ids=["400", "503", "request", "response", "runtime", "job"],
)
def test_anything_else_is_a_failed_transfer_with_the_short_reason(sdk_error: Exception) -> None:
    error = mapped(sdk_error)
    assert isinstance(error, errors.TransferFailed) and error.exit_code == Exit.FAILED == 1
    reason = str(getattr(sdk_error, "message", sdk_error)).splitlines()[0]
    assert error.message == f"{FAILED}: {reason} (--verbose shows the SDK's error)\n{AFTERWARDS}"
    assert "the body is wrong" in reason

    verbose = mapped(sdk_error, verbose=True)
    assert verbose.message == f"{FAILED}: {reason}\n{sdk_error}\n{AFTERWARDS}"


def test_our_own_errors_pass_unchanged() -> None:
    ours = BadInput("a version clash")
    assert mapped(ours) is ours


def test_a_command_shows_the_message_and_exit_code_without_a_traceback() -> None:
    @click.command()
    @click.argument("kind")
    def call(kind: str) -> None:
        failures = {
            "denied": http_error(HttpResponseError, 403, "Forbidden"),
            "missing": http_error(ResourceNotFoundError, 404, "Not found"),
            "down": http_error(HttpResponseError, 500, "(InternalError) try later"),
        }
        with errors.sdk_errors(TARGET, False, failed="pull of m:1 failed", not_found="m:1 not found"):
            raise failures[kind]

    runner = CliRunner()
    expected = [
        ("denied", 3, "refused the request (403"),
        ("missing", 2, "Error: m:1 not found"),
        ("down", 1, "Error: pull of m:1 failed: (InternalError) try later"),
    ]
    for kind, code, text in expected:
        result = runner.invoke(call, [kind])
        assert result.exit_code == code, result.output
        assert text in result.output and "Traceback" not in result.output


def test_only_transient_failures_are_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(errors.time, "sleep", lambda seconds: None)
    calls: list[int] = []

    def flaky(status: int) -> str:
        calls.append(status)
        if len(calls) == 1:
            raise http_error(HttpResponseError, status, "once")
        return "done"

    assert errors.with_retries("upload", lambda: flaky(503), attempts=3, backoff_s=1.0) == "done"
    assert calls == [503, 503]
    calls.clear()
    with pytest.raises(HttpResponseError):
        errors.with_retries("upload", lambda: flaky(400), attempts=3, backoff_s=1.0)
    assert calls == [400]
