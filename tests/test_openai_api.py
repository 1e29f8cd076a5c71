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
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": False}, "top_p"),
        ({"n": 2}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"seed": "7"}, "seed"),
        ({"stream_options": "usage"}, "stream_options"),
    ],
)
def test_each_bad_field_is_a_400_naming_it(fields, param):
    with pytest.raises(api.ApiError) as error:
        parse(**fields)
    assert error.value.status == 400 and error.value.param == param
    body = error.value.body()["error"]
    assert body["type"] == "invalid_request_error" and body["param"] == param and body["message"]


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


def test_a_stop_string_split_across_pieces_is_cut_and_never_sent():
    usage = api.Usage(prompt_tokens=5)
    stream = tokens((1, "Go to Tr"), (2, "as"), (3, "tevere, E"), (4, "ND here"), (5, "never read"))
    out = list(api.pieces(stream, eos_ids={0}, stop=["tevere", "END"], usage=usage))
    assert "".join(text for text, _ in out) == "Go to Tras"
    assert out[-1][1] == "stop" and all(reason is None for _, reason in out[:-1])
    assert usage.completion_tokens == 3  # generation stopped at the stop string


def test_held_back_text_that_is_not_a_stop_string_comes_out_at_the_end():
    usage = api.Usage(prompt_tokens=5)
    out = list(api.pieces(tokens((1, "ab"), (2, "cE"), (3, "N")), eos_ids={0}, stop=["END"], usage=usage))
    assert "".join(text for text, _ in out) == "abcEN" and out[-1][1] == "length"
    assert usage.payload() == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_an_end_of_sequence_token_stops_with_its_text_left_out():
    usage = api.Usage(prompt_tokens=2)
    out = list(api.pieces(tokens((1, "Hi"), (0, "</s>"), (2, "x")), eos_ids={0}, stop=[], usage=usage))
    assert out == [("Hi", None), ("", "stop")] and usage.completion_tokens == 2


def test_closing_the_pieces_closes_the_token_stream():
    closed = []

    def stream():
        try:
            yield from ((i, "word ") for i in range(1, 100))
        finally:
            closed.append(True)

    answer = api.pieces(stream(), eos_ids=set(), stop=[], usage=api.Usage(1))
    next(answer)
    answer.close()
    assert closed == [True]


def test_a_completion_has_the_text_the_finish_reason_and_the_usage():
    usage = api.Usage(prompt_tokens=4, completion_tokens=2)
    payload = api.completion("none", [("Hello", None), (" there", None), ("", "stop")], usage)
    assert payload["object"] == "chat.completion" and payload["model"] == "none"
    assert payload["choices"][0]["message"] == {"role": "assistant", "content": "Hello there"}
    assert payload["choices"][0]["finish_reason"] == "stop"
    assert payload["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_the_stream_events_are_role_text_finish_usage_and_done():
    usage = api.Usage(prompt_tokens=4)

    def answer():
        usage.completion_tokens = 2
        yield from [('He said "hi"\n', None), ("", "length")]

    events = [e.decode() for e in api.sse_events("travel", answer(), usage, include_usage=True)]
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    assert events[-1] == "data: [DONE]\n\n"
    role, text, finish, last = (json.loads(e.removeprefix("data: ")) for e in events[:-1])
    assert {c["id"] for c in (role, text, finish, last)} == {role["id"]}
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert text["object"] == "chat.completion.chunk" and text["model"] == "travel"
    assert text["choices"][0]["delta"] == {"content": 'He said "hi"\n'}
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    without = list(api.sse_events("travel", answer(), usage, include_usage=False))
    assert len(without) == len(events) - 1


def test_the_models_payloads():
    assert api.model_list(MODELS, 7) == {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 7, "owned_by": "olivepress"} for n in MODELS],
    }


class FakeEngine:
    """What Service uses of an Engine: names, the chat template, the context and the generation loop."""

    names = MODELS
    context_length = 32
    eos_token_ids = {0}

    def __init__(self) -> None:
        self.asked = []

    def chat_tokens(self, messages):
        return [7] * sum(len(m["content"].split()) for m in messages)

    def stream(self, ids, adapter, max_new_tokens, temperature=0.0, top_p=1.0, seed=None):
        self.asked.append((adapter, max_new_tokens, temperature, top_p, seed))
        yield from ((i, f"w{i} ") for i in range(1, max_new_tokens + 1))


def test_the_service_tokenizes_budgets_and_generates_with_the_adapter_asked_for():
    engine = FakeEngine()
    service = api.Service(engine, default_max_tokens=100)
    generation = service.prepare({"model": "none", "messages": USER, "temperature": 0.5, "seed": 1})
    assert generation.ids == [7] * 6 and generation.max_tokens == 26  # capped by the context: 32 - 6
    payload = api.completion(generation.request.model, service.pieces(generation), generation.usage)
    assert engine.asked == [("base", 26, 0.5, 1.0, 1)]
    assert payload["usage"] == {"prompt_tokens": 6, "completion_tokens": 26, "total_tokens": 32}
    assert payload["choices"][0]["finish_reason"] == "length"
    assert service.model("none")["id"] == "none" and service.models()["data"][1]["id"] == "travel"
    with pytest.raises(api.ApiError) as error:
        service.model("cooking")
    assert error.value.status == 400 and error.value.param == "model"


def test_a_full_service_is_a_429_rate_limit_error():
    service = api.Service(FakeEngine(), max_concurrent=1)
    service.acquire()
    assert service.health()["active"] == 1
    with pytest.raises(api.ApiError) as error:
        service.acquire()
    assert error.value.status == 429 and error.value.kind == "rate_limit_error"
    service.release()
    service.acquire()
    assert service.health() == {"status": "ok", "models": MODELS, "active": 1, "max_concurrent": 1}


def test_the_runtime_imports_only_what_the_slim_image_has():
    import ast
    import sys
    from pathlib import Path

    allowed = set(sys.stdlib_module_names) | {"click", "rich", "numpy", "onnxruntime_genai", "contract", "runtime"}
    for path in (Path(__file__).resolve().parent.parent / "runtime").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            assert {n.split(".")[0] for n in names} <= allowed, f"{path.name} imports {names}"
