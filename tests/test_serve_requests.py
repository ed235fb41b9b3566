"""Tests of lamda_edge/serve/requests.py (each field's check) and the stop strings of lamda_edge/serve/engine.py."""

from __future__ import annotations

import pytest

from lamda_edge.serve.engine import StopText
from lamda_edge.serve.requests import (
    DEFAULT_MAX_TOKENS,
    ApiError,
    check_lengths,
    parse_chat,
    parse_classify,
    parse_completion,
    parse_json,
)

USER = [{"role": "user", "content": "hi"}]


def test_a_chat_request_with_every_supported_field():
    req = parse_chat({"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                                 {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                              {"type": "text", "text": "b"}]}],
                      "max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "\n", "stream": True,
                      "stream_options": {"include_usage": True}, "n": 1, "presence_penalty": 0, "user": "u"})
    assert req.messages[1] == {"role": "user", "content": "ab"}  # text parts joined
    assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.stop) == (9, 0.5, 0.9, 3, ("\n",))
    assert req.stream and req.include_usage and not req.ignore_eos
    defaults = parse_completion({"prompt": ["once"]})
    assert (defaults.prompt, defaults.temperature, defaults.top_p, defaults.max_tokens) == ("once", None, 1.0, None)


@pytest.mark.parametrize("body, param", [
    pytest.param({"messages": []}, "messages", id="empty-messages"),
    pytest.param({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]", id="unknown-role"),
    pytest.param({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", id="content-not-text"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content",
                 id="image-part"),
    pytest.param({"messages": USER, "n": 2}, "n", id="n-above-1"),
    pytest.param({"messages": USER, "tools": []}, "tools", id="tools"),
    pytest.param({"messages": USER, "max_tokens": True}, "max_tokens", id="max-tokens-bool"),
    pytest.param({"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens", id="max-completion-0"),
    pytest.param({"messages": USER, "temperature": 2.5}, "temperature", id="temperature-above-2"),
    pytest.param({"messages": USER, "temperature": float("inf")}, "temperature", id="temperature-inf"),
    pytest.param({"messages": USER, "top_p": 0}, "top_p", id="top-p-0"),
    pytest.param({"messages": USER, "seed": 1.5}, "seed", id="seed-float"),
    pytest.param({"messages": USER, "stop": ["a"] * 5}, "stop", id="five-stops"),
    pytest.param({"messages": USER, "stop": [""]}, "stop", id="empty-stop"),
    pytest.param({"messages": USER, "stream": "yes"}, "stream", id="stream-not-bool"),
    pytest.param({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options",
                 id="stream-options-without-stream"),
    pytest.param({"messages": USER, "model": 3}, "model", id="model-not-string"),
])
def test_bad_chat_fields_are_400_naming_the_field(body, param):
    with pytest.raises(ApiError) as caught:
        parse_chat(body)
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.body()["error"]["param"] == param


def test_bodies_that_are_not_json_objects():
    for raw in (b"{", b"\xff", b"[]", b'"text"'):
        with pytest.raises(ApiError, match="JSON") as caught:
            parse_json(raw)
        assert caught.value.status == 400
    assert parse_json(b'{"a": NaN}')["a"] != 0  # NaN parses; the field check refuses it with its name


def test_completion_and_classify_fields():
    for prompt in ("", ["a", "b"], 5, None):
        with pytest.raises(ApiError, match="prompt"):
            parse_completion({"prompt": prompt})
    assert parse_classify({"text": "a", "text_pair": "b"}).pairs == ["b"]
    with pytest.raises(ApiError, match="text_pair"):
        parse_classify({"text": ["a", "b"], "text_pair": ["c"]})
    with pytest.raises(ApiError, match="text"):
        parse_classify({"text": ["ok", " "]})


def test_check_lengths():
    assert check_lengths(10, None, 100) == 90 and check_lengths(10, 5, 100) == 5
    assert check_lengths(1, None, 10**6) == DEFAULT_MAX_TOKENS
    with pytest.raises(ApiError, match="leaves none") as caught:
        check_lengths(100, 5, 100)
    assert caught.value.body()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(ApiError, match="above the model's context"):
        check_lengths(10, 101, 100)


@pytest.mark.parametrize("pieces, stops, text", [
    pytest.param(["Hel", "lo\n", "\nBye"], ("\n\n",), "Hello", id="stop-across-pieces"),
    pytest.param(["a", "b", "c", "d"], ("bd", "cd"), "ab", id="held-back-prefix-released"),
    pytest.param(["x", "y"], ("z",), "xy", id="no-stop"),
    pytest.param(["ab", "cSTOPd"], ("STOP",), "abc", id="stop-inside-a-piece"),
])
def test_stop_text_streams_exactly_the_final_text(pieces, stops, text):
    """As the generator drives it: after each token, `check` with the ids so far; then `feed` the new text if no stop
    was found; at the end `finish` with the full decoded text. What was sent adds up to the final text, and nothing
    past a stop string is ever sent."""
    sent = []
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731 (ids are piece indexes here)
    stop = StopText(stops, decode, sent.append)
    new = []
    for i, piece in enumerate(pieces):
        new.append(i)
        if stop.check(new):
            break
        stop.feed(piece)
        assert not any(s in "".join(sent) for s in stops)
    assert stop.finish(decode(new)) == text == "".join(sent)
