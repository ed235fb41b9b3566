"""The request bodies of the OpenAI-compatible API, checked field by field, and the error that answers a bad one.

    JSON body ──> parse_chat / parse_completion / parse_classify ──> GenerationRequest / ClassifyRequest
                      └──> ApiError (status, OpenAI-style error JSON naming the field, the value and the fix)

Every field the server does not implement is refused by name (400) instead of being silently ignored; the few that
clients send at their neutral value (`n: 1`, penalties 0, `logprobs: false`, `user`) are accepted.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from lamda_edge.errors import ConfigError

DEFAULT_MAX_TOKENS = 256  # a request without max_tokens: at most this many (and never past the context)
MAX_STOPS = 4  # OpenAI's limit on `stop` strings
ROLES = ("system", "user", "assistant")
# fields a client may send at their neutral value: name -> the values that change nothing
NEUTRAL = {"n": (1, None), "presence_penalty": (0, None), "frequency_penalty": (0, None),
           "logprobs": (False, None), "echo": (False, None), "best_of": (1, None)}
SAMPLING = ("model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
            "stream_options", "ignore_eos", "user")


class ApiError(ConfigError):
    """A request the server refuses: the HTTP status and OpenAI's error object (message, type, param, code)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.type, self.headers = status, param, code, type, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    """A checked chat or completion request (`messages` for chat, `prompt` for a completion)."""

    model: str | None
    messages: list[dict] | None
    prompt: str | None
    max_tokens: int | None
    temperature: float | None  # None: not given (OpenAI's default 1; an encoder-decoder's 0)
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool


@dataclass(frozen=True)
class ClassifyRequest:
    model: str | None
    texts: list[str]
    pairs: list[str] | None


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object (400 when it is not JSON, or not an object)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}. Fix: send one JSON object",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body is a JSON {type(body).__name__}, not an object. Fix: send one JSON "
                       "object such as {\"model\": ..., \"messages\": [...]}", code="invalid_json")
    return body


def parse_chat(body: dict) -> GenerationRequest:
    """A /v1/chat/completions body: `messages` (system/user/assistant, text content) and the sampling fields."""
    _refuse_unknown(body, {"messages", *SAMPLING})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"`messages` should be a non-empty list of {{role, content}} objects, got "
                       f"{_show(messages)}. Fix: e.g. \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]",
                       param="messages")
    return _sampling(body, messages=[_message(m, i) for i, m in enumerate(messages)], prompt=None)


def parse_completion(body: dict) -> GenerationRequest:
    """A /v1/completions body: `prompt` (a string, or a list of one string) and the sampling fields."""
    _refuse_unknown(body, {"prompt", *SAMPLING})
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, f"`prompt` should be a non-empty string, got {_show(prompt)}. Fix: e.g. \"prompt\": "
                       "\"Once upon a time\" (one prompt per request)", param="prompt")
    return _sampling(body, messages=None, prompt=prompt)


def parse_classify(body: dict) -> ClassifyRequest:
    """A /v1/classify body: `text` (a string or a list), optional `text_pair` of the same shape."""
    _refuse_unknown(body, {"model", "text", "text_pair"})
    texts, pairs = _texts(body, "text"), _texts(body, "text_pair") if body.get("text_pair") is not None else None
    if pairs is not None and len(pairs) != len(texts):
        raise ApiError(400, f"{len(texts)} texts but {len(pairs)} text pairs. Fix: give one `text_pair` per `text`",
                       param="text_pair")
    return ClassifyRequest(_model(body), texts, pairs)


def check_lengths(prompt_tokens: int, max_tokens: int | None, context: int) -> int:
    """The new-token budget of a request: 400 when the prompt leaves no room or `max_tokens` passes the context."""
    if prompt_tokens >= context:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens, but the model's context is {context}, which "
                       "leaves none to generate. Fix: shorten the prompt", param="messages",
                       code="context_length_exceeded")
    if max_tokens is not None and max_tokens > context:
        raise ApiError(400, f"`max_tokens` is {max_tokens}, above the model's context of {context} tokens. Fix: "
                       f"ask for at most {context - prompt_tokens} with this prompt", param="max_tokens",
                       code="context_length_exceeded")
    return min(max_tokens or DEFAULT_MAX_TOKENS, context - prompt_tokens)


# ---- fields --------------------------------------------------------------------------------------------------------


def _sampling(body: dict, messages, prompt) -> GenerationRequest:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise ApiError(400, f"`{name}` should be a positive integer, got {_show(max_tokens)}. Fix: e.g. "
                       f"\"{name}\": 128", param=name)
    temperature = _number(body, "temperature", None, 0.0, 2.0, "0 = greedy, e.g. 0.7")  # None: the engine's
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, "e.g. 0.9")
    if top_p == 0:
        raise ApiError(400, "`top_p` should be in (0, 1], got 0. Fix: e.g. 0.9", param="top_p")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, f"`seed` should be an integer, got {_show(seed)}", param="seed")
    stream, ignore_eos = _flag(body, "stream"), _flag(body, "ignore_eos")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError(400, f"`stream_options` should be {{\"include_usage\": true|false}} with \"stream\": true, "
                       f"got {_show(options)}", param="stream_options")
    include_usage = bool((options or {}).get("include_usage"))
    return GenerationRequest(_model(body), messages, prompt, max_tokens, temperature, top_p,
                             None if seed is None else int(seed) & 0xFFFFFFFF, _stops(body.get("stop")), stream,
                             include_usage, ignore_eos)


def _refuse_unknown(body: dict, known: set[str]) -> None:
    extra = sorted(k for k in body if k not in known and not (k in NEUTRAL and body[k] in NEUTRAL[k]))
    if extra:
        raise ApiError(400, f"unsupported parameter{'s' if len(extra) > 1 else ''}: {', '.join(extra)}. This "
                       f"server implements {', '.join(sorted(known))}. Fix: leave the others out",
                       param=extra[0], code="unsupported_parameter")


def _message(message, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ApiError(400, f"{where} should be an object with a `role` in {ROLES} and a text `content`, got "
                       f"{_show(message)}", param=where)
    if set(message) - {"role", "content", "name"}:
        raise ApiError(400, f"{where} has unsupported keys {sorted(set(message) - {'role', 'content', 'name'})}; "
                       "this server takes text messages only", param=where, code="unsupported_parameter")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise ApiError(400, f"{where}.content holds a part that is not {{\"type\": \"text\", \"text\": ...}}; "
                           "this server takes text only", param=f"{where}.content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content should be a string, got {_show(content)}", param=f"{where}.content")
    return {"role": message["role"], "content": content}


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"`model` should be a string, got {_show(model)}. Fix: see GET /v1/models", param="model")
    return model


def _number(body: dict, name: str, default: float | None, low: float, high: float, example: str) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ApiError(400, f"`{name}` should be a number in [{low:g}, {high:g}], got {_show(value)}. Fix: {example}",
                       param=name)
    return float(value)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool) and value is not None:
        raise ApiError(400, f"`{name}` should be true or false, got {_show(value)}", param=name)
    return bool(value)


def _stops(stop) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"`stop` should be a non-empty string or a list of up to {MAX_STOPS} of them, got "
                       f"{_show(stop)}", param="stop")
    return tuple(stops)


def _texts(body: dict, name: str) -> list[str]:
    value = body.get(name)
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ApiError(400, f"`{name}` should be a non-empty string or a list of them, got {_show(value)}. Fix: "
                       f"e.g. \"{name}\": \"a great film\"", param=name)
    return texts


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
