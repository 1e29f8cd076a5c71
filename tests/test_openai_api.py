"""runtime.openai_api: request checks, stop strings, usage and payloads, with no model and no socket."""

from __future__ import annotations

import json

import pytest

from runtime import openai_api as api

MODELS = ["base", "travel"]
USER = [{"role": "user", "content": "Where should I eat in Rome?"}]


def parse(**fields):
    return api.parse_chat_request({"model": "travel", "messages": USER, **fields}, MODELS, default_max_tokens=64)


def tokens(*pairs):
    """A token stream as Engine.stream gives it: (token id, text piece)."""
    yield from pairs


def test_a_valid_request_becomes_a_typed_request_with_defaults():
    request = parse()
    assert request == api.ChatRequest(model="travel", adapter="travel", messages=USER, max_tokens=64)
    full = parse(
        max_tokens=8, temperature=0.7, top_p=0.9, seed=3, stop="\n", stream=True, stream_options={"include_usage": True}
    )
    assert (full.max_tokens, full.temperature, full.top_p, full.seed, full.stop) == (8, 0.7, 0.9, 3, ("\n",))
    assert full.stream and full.include_usage
    assert parse(max_completion_tokens=5, max_tokens=9).max_tokens == 5  # the newer field wins
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    assert parse(messages=[{"role": "user", "content": parts}]).messages == [{"role": "user", "content": "Hello there"}]


def test_every_alias_of_base_picks_the_base_and_is_echoed_as_sent():
    for alias in ("base", "none"):
        request = api.parse_chat_request({"model": alias, "messages": USER}, MODELS, 64)
        assert request.adapter == "base" and request.model == alias


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"model": "cooking"}, "model"),
        ({"model": None}, "model"),
        ({"model": 3}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"content": "no role"}]}, "messages[0].role"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [*USER, {"role": "user", "content": [{"type": "image_url"}]}]}, "messages[1].content"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "name": 5}]}, "messages[0].name"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": 2**70}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": False}, "top_p"),
        ({"n": 2}, "n"),
        ({"n": "1"}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"seed": "7"}, "seed"),
        ({"seed": 2**70}, "seed"),
        ({"seed": -(2**64)}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": "usage"}, "stream_options"),
        ({"stream": True, "stream_options": 5}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # only with stream: true, as OpenAI's
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": "no"}, "logprobs"),
        ({"top_logprobs": 99}, "top_logprobs"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"logit_bias": []}, "logit_bias"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": "none"}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"user": 5}, "user"),
    ],
)
def test_each_bad_field_is_a_400_naming_it(fields, param):
    with pytest.raises(api.ApiError) as error:
        parse(**fields)
    assert error.value.status == 400 and error.value.param == param
    body = error.value.body()["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == param and body["message"]


def test_defaults_and_nulls_of_unsupported_fields_are_accepted_and_unknown_fields_ignored():
    accepted = parse(
        n=1, frequency_penalty=0, presence_penalty=None, logprobs=False, logit_bias={}, tools=None, tool_choice="none",
        response_format={"type": "text"}, user="me", stream=None, stream_options=None, seed=None, metadata={"a": 1},
        temperature=None, top_p=None, max_tokens=None, stop=None,
    )  # fmt: skip
    assert accepted == parse()
    assert parse(seed=2**63 - 1).seed == (2**63 - 1) % api.OG_SEEDS and parse(seed=-5).seed == -5 % api.OG_SEEDS
    assert parse(max_tokens=2**31 - 1).max_tokens == 2**31 - 1  # the context caps it later


def test_a_body_that_is_not_an_object_and_an_unknown_model_say_what_is_wrong():
    with pytest.raises(api.ApiError, match="JSON object"):
        api.parse_chat_request(["a list"], MODELS, 64)
    with pytest.raises(api.ApiError, match="no model named 'cooking'; choose one of: base, travel"):
        parse(model="cooking")
    with pytest.raises(api.ApiError, match="no model named 'none' .*merged"):  # a merged build has no base
        api.parse_chat_request({"model": "none", "messages": USER}, ["travel"], 64)


def test_the_budget_is_capped_by_the_context_and_a_prompt_too_long_is_a_400():
    assert api.token_budget(64, prompt_tokens=10, context_length=50) == 40
    assert api.token_budget(8, prompt_tokens=10, context_length=50) == 8
    with pytest.raises(api.ApiError) as error:
        api.token_budget(8, prompt_tokens=50, context_length=50)
    assert error.value.status == 400 and error.value.param == "messages"


def answer(pairs, eos_ids=frozenset({0}), stop=(), usage=None):
    """What AnswerText makes of a token stream: the text sent piece by piece, and the finish reason."""
    text = api.AnswerText(set(eos_ids), stop, usage or api.Usage(prompt_tokens=5))
    out = []
    for token, piece in pairs:
        out.append(text.feed(token, piece))
        if text.finish:
            return out, text.finish
    out.append(text.close("length"))
    return out, text.finish


def test_a_stop_string_split_across_pieces_is_cut_and_never_sent():
    usage = api.Usage(prompt_tokens=5)
    pairs = [(1, "Go to Tr"), (2, "as"), (3, "tevere, E"), (4, "ND here"), (5, "never read")]
    out, finish = answer(pairs, stop=["tevere", "END"], usage=usage)
    assert "".join(out) == "Go to Tras" and finish == "stop"
    assert usage.completion_tokens == 3  # generation stopped at the stop string


def test_held_back_text_that_is_not_a_stop_string_comes_out_at_the_end():
    usage = api.Usage(prompt_tokens=5)
    out, finish = answer([(1, "ab"), (2, "cE"), (3, "N")], stop=["END"], usage=usage)
    assert "".join(out) == "abcEN" and finish == "length"
    assert usage.payload() == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_an_end_of_sequence_token_stops_with_its_text_left_out():
    usage = api.Usage(prompt_tokens=2)
    out, finish = answer([(1, "Hi"), (0, "</s>"), (2, "x")], usage=usage)
    assert out == ["Hi", ""] and finish == "stop" and usage.completion_tokens == 2


def test_a_completion_has_the_text_the_finish_reason_and_the_usage():
    usage = api.Usage(prompt_tokens=4, completion_tokens=2)
    payload = api.completion("none", "Hello there", "stop", usage)
    assert payload["object"] == "chat.completion" and payload["model"] == "none"
    assert payload["choices"][0]["message"] == {"role": "assistant", "content": "Hello there"}
    assert payload["choices"][0]["finish_reason"] == "stop"
    assert payload["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_the_stream_events_are_role_text_finish_usage_and_done():
    usage = api.Usage(prompt_tokens=4, completion_tokens=2)
    stream = api.EventStream("travel")
    raw = [stream.start(), stream.content('He said "hi"\n'), stream.finish("length"), stream.usage(usage)]
    events = [e.decode() for e in [*raw, stream.done()]]
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    assert events[-1] == "data: [DONE]\n\n"
    role, text, finish, last = (json.loads(e.removeprefix("data: ")) for e in events[:-1])
    assert {c["id"] for c in (role, text, finish, last)} == {role["id"]}
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert text["object"] == "chat.completion.chunk" and text["model"] == "travel"
    assert text["choices"][0]["delta"] == {"content": 'He said "hi"\n'}
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    error = json.loads(stream.error(api.ApiError(503, "going away", kind="server_error")).decode()[6:])
    assert error == {"error": {"message": "going away", "type": "server_error", "param": None, "code": None}}


def test_the_models_payloads():
    assert api.model_list(MODELS, 7) == {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 7, "owned_by": "olivepress"} for n in MODELS],
    }


class FakeEngine:
    """What Service uses of an Engine: names, the chat template, the context."""

    names = MODELS
    context_length = 32
    eos_token_ids = {0}
    pad_token_id = 0

    def chat_tokens(self, messages):
        return [7] * sum(len(m["content"].split()) for m in messages)


def test_the_service_tokenizes_budgets_and_submits_with_the_adapter_asked_for():
    service = api.Service(FakeEngine(), default_max_tokens=100)
    generation = service.prepare({"model": "none", "messages": USER, "temperature": 0.5, "seed": 2**40})
    assert generation.ids == [7] * 6 and generation.max_tokens == 26  # capped by the context: 32 - 6
    assert generation.request.adapter == "base" and generation.request.seed == 2**40 % api.OG_SEEDS
    job = service.submit(generation, deliver=lambda item: None, arrived=0.0)
    assert (job.adapter, job.max_new_tokens, job.sampling.temperature, job.deadline) == ("base", 26, 0.5, 600.0)
    assert list(service.scheduler.pending) == [job]
    assert service.model("none")["id"] == "none" and service.models()["data"][1]["id"] == "travel"
    with pytest.raises(api.ApiError) as error:
        service.model("cooking")
    assert error.value.status == 400 and error.value.param == "model"


def test_a_full_service_is_a_429_and_a_draining_one_a_503():
    service = api.Service(FakeEngine(), max_concurrent=1)
    service.acquire()
    assert service.health()["active"] == 1
    with pytest.raises(api.ApiError) as error:
        service.acquire()
    assert error.value.status == 429 and error.value.kind == "rate_limit_error"
    service.release()
    service.acquire()
    assert service.health() == {"status": "ok", "models": MODELS, "active": 1, "max_concurrent": 1}
    service.release()
    service.begin_shutdown(grace_s=1)
    with pytest.raises(api.ApiError) as error:
        service.acquire()
    assert error.value.status == 503 and service.health()["status"] == "draining"


def test_the_runtime_imports_only_what_the_slim_image_has():
    import ast
    import sys
    from pathlib import Path

    allowed = set(sys.stdlib_module_names) | {"click", "rich", "numpy", "onnxruntime_genai", "contract", "runtime"}
    allowed |= {"uvicorn", "starlette", "prometheus_client"}  # the server's stack (docker/requirements/infer.in)
    for path in (Path(__file__).resolve().parent.parent / "runtime").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            assert {n.split(".")[0] for n in names} <= allowed, f"{path.name} imports {names}"
