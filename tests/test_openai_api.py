"""The router's OpenAI wire format without a cluster: what a request may hold, and what comes back
(the served tests in test_serving.py check the same cases over real HTTP)."""

import json

import pytest
from memo.config import ServeConfig
from memo.serving.openai_api import ApiError, completion_body, parse_model, parse_request, sse_stream

CFG = ServeConfig(max_new_tokens=16, max_tokens_cap=32, max_prompt_chars=200)


def chat(content, model="demo", **extra):
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def refused(body, kind="chat") -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_request(body, kind, CFG)
    return e.value


def test_models_name_a_memory_or_the_memo_answer_over_several():
    assert parse_model("demo") == (["demo"], False)
    assert parse_model("memo-demo") == (["demo"], False)
    assert parse_model("memo/demo") == (["demo"], True)
    assert parse_model("memo/hr+legal+hr") == (["hr", "legal"], True)
    for bad in ("memo/", "memo/hr+", "Bad Name", "memo/a+B!"):
        with pytest.raises(ApiError) as e:
            parse_model(bad)
        assert e.value.status == 404 and e.value.param == "model"


@pytest.mark.parametrize("model", ["demo", "memo/demo"])
def test_text_a_tokenizer_cannot_take_is_a_400_and_controls_are_dropped(model):
    e = refused(chat("who\ud800?", model))
    assert e.status == 400 and e.param == "messages[0].content" and "surrogate" in e.message
    assert parse_request(chat("\u0000Who keeps\u0007 the lighthouse?\x7f", model), "chat", CFG).question == \
        "Who keeps the lighthouse?"
    assert refused(chat("\u0000\u0001", model)).message.endswith("holds no text (after removing control characters)")
    assert refused({"model": model, "prompt": "a\udfffb"}, "completion").param == "prompt"


@pytest.mark.parametrize("model", ["demo", "memo/demo"])
def test_content_as_text_parts(model):
    parts = [{"type": "text", "text": "Who keeps"}, {"type": "text", "text": "the lighthouse?"}]
    assert parse_request(chat(parts, model), "chat", CFG).question == "Who keeps\nthe lighthouse?"
    e = refused(chat([{"type": "image_url", "image_url": {"url": "x"}}], model))
    assert e.status == 400 and e.param == "messages[0].content[0]" and "'image_url'" in e.message


@pytest.mark.parametrize("model", ["demo", "memo/demo"])
@pytest.mark.parametrize("extra, param", [
    ({"temperature": "hot"}, "temperature"), ({"temperature": 3}, "temperature"), ({"temperature": True}, "temperature"),
    ({"n": 3}, "n"), ({"top_p": 2}, "top_p"), ({"stream": "yes"}, "stream"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 33}, "max_tokens"), ({"max_completion_tokens": -1}, "max_completion_tokens"),
])
def test_bad_sampling_fields_name_the_field(model, extra, param):
    e = refused(chat("Who?", model, **extra))
    assert (e.status, e.param) == (400, param)


def test_memo_fields_belong_to_the_memo_answer():
    assert refused(chat("Who?", memo_protocol="single")).param == "model"
    assert refused(chat("Who?", "memo/demo", memo_protocol="fancy")).param == "memo_protocol"
    req = parse_request(chat("Who?", "memo/demo", memo_protocol="structured", memo_trace=True, stream=True,
                             stream_options={"include_usage": True}, temperature=0.2), "chat", CFG)
    assert (req.executive, req.protocol, req.trace, req.stream, req.include_usage, req.temperature) == \
        (True, "structured", True, True, True, 0.2)
    assert parse_request(chat("Who?", max_tokens=None), "chat", CFG).max_tokens == 16
    assert refused(chat("x" * 201)).status == 413


def _events(req, text, finish="stop"):
    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    raw = "".join(sse_stream(req, text, finish, usage, {"memo_version": "2"}))
    assert raw.endswith("data: [DONE]\n\n")
    return [json.loads(line[6:]) for line in raw.split("\n\n") if line.startswith("data: {")]


def test_a_stream_is_openai_chunks_that_add_up_to_the_answer():
    req = parse_request(chat("Who?", "memo/demo", stream=True, stream_options={"include_usage": True}), "chat", CFG)
    events = _events(req, "Mara Quill keeps it.", "length")
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == \
        "Mara Quill keeps it."
    assert {e["object"] for e in events} == {"chat.completion.chunk"} and len({e["id"] for e in events}) == 1
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1]["choices"] == []
    assert events[-1]["usage"]["total_tokens"] == 12 and all(e["memo_version"] == "2" for e in events)
    plain = parse_request({"model": "demo", "prompt": "Who?", "stream": True}, "completion", CFG)
    events = _events(plain, "Mara Quill.")
    assert "".join(e["choices"][0]["text"] for e in events) == "Mara Quill." and "usage" not in events[-1]


def test_completion_body_shapes():
    req = parse_request(chat("Who?"), "chat", CFG)
    body = completion_body(req, "Mara.", "length", {"prompt_tokens": 1}, {"memo_version": "3"})
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Mara."} and body["memo_version"] == "3"
