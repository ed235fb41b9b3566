"""Tests of lamda_edge/serve/: `lamda-edge serve` on a free loopback port, spoken to with the official `openai` client
(chat streamed and not, completions, classify) and plain HTTP (httpx2, openai's own HTTP client) for what a client
library hides: each bad input's 4xx, the API key, 429 when the queue is full, 504 past the deadline, a client that
disconnects, and SIGTERM's drain (a real subprocess)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2
import openai
import pytest

from lamda_edge.runtime.generate import repetition_stop
from lamda_edge.serve.app import ServeSettings
from lamda_edge.serve.engine import Engine
from lamda_edge.serve.server import make_server

KEY, MODEL = "test-key-123", "tiny"
PROMPT, NEW_TOKENS = "hello world, how are you?", 40
LONG = {"max_tokens": 2000, "ignore_eos": True, "temperature": 1.0}  # seconds of work for the tiny model
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny, run_export):
    """A tiny Llama (2048 positions; untied, so greedy text does not loop at once) and a tiny BERT classifier."""
    root = tmp_path_factory.mktemp("serve-http")
    tiny.save(root / "llama", "llama", seed=4, positions=2048)
    run_export(root / "gen", model=root / "llama")
    tiny.save(root / "bert", "bert", seed=1)
    run_export(root / "cls", model=root / "bert")
    return root


@pytest.fixture(scope="module")
def gen_engine(exports):
    return Engine(exports / "gen")


@pytest.fixture(scope="module")
def server(gen_engine):
    with running(gen_engine, api_key=KEY, max_body_bytes=64 * 1024) as url:
        yield url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(engine, **settings):
    """A server in a thread on a free loopback port; stopped (with a timeout) even when the test fails."""
    port = free_port()
    server = make_server(engine, ServeSettings(model_name=MODEL, **settings), port=port, grace_s=5,
                         log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not stop"


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def post(url: str, path: str, body, key: str = KEY, **kw) -> httpx2.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx2.post(f"{url}{path}", content=data, headers={"Authorization": f"Bearer {key}"}, timeout=60, **kw)


def health(url: str) -> dict:
    return httpx2.get(f"{url}/health", timeout=10).json()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- the openai client ---------------------------------------------------------------------------------------------


def test_chat_streamed_equals_non_streamed_equals_generate(server, gen_engine, exports, capsys):
    from lamda_edge.cli import main

    messages = [{"role": "user", "content": PROMPT}]
    full = client(server).chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                  max_tokens=NEW_TOKENS)
    stream = client(server).chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                    max_tokens=NEW_TOKENS, stream=True,
                                                    stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert main(["generate", "--model", str(exports / "gen"), "--prompt", PROMPT,
                 "--max-new-tokens", str(NEW_TOKENS)]) == 0
    printed = capsys.readouterr().out
    text = full.choices[0].message.content
    assert len(text) >= 10 and text == streamed == printed[:-1]  # generate ends its text with one newline
    # usage counts are the tokenizer's real counts
    ids = gen_engine.model.encode(PROMPT)
    want = gen_engine.model.generate("", prompt_ids=ids, max_new_tokens=NEW_TOKENS, stop=repetition_stop)
    assert (full.usage.prompt_tokens, full.usage.completion_tokens) == (len(ids), len(want.token_ids))
    assert chunks[-1].usage.completion_tokens == len(want.token_ids) and chunks[-1].choices == []
    assert full.choices[0].finish_reason == ("length" if want.stopped_by == "max_new_tokens" else "stop")
    assert chunks[0].choices[0].delta.role == "assistant"


def test_completions_streamed_and_not_and_models(server, gen_engine):
    prompt = "the quick brown fox"
    want = gen_engine.model.generate(prompt, chat=False, max_new_tokens=12, stop=repetition_stop)
    done = client(server).completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    streamed = "".join(c.choices[0].text for c in client(server).completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert done.choices[0].text == streamed == want.text and want.text
    assert done.usage.prompt_tokens == want.prompt_tokens
    assert [m.id for m in client(server).models.list()] == [MODEL]


def test_sampling_is_seeded_and_stop_strings_cut_the_text(server):
    def complete(**kw):
        return client(server).completions.create(model=MODEL, prompt="water boils", max_tokens=20, **kw)

    runs = [complete(temperature=1.0, seed=s).choices[0].text for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
    greedy = complete(temperature=0).choices[0].text
    # a stop string from the middle of the text: a printable character first seen past its start
    stop = next(c for i, c in enumerate(greedy) if i >= 2 and c.isascii() and c.isprintable() and greedy.find(c) == i)
    cut = complete(temperature=0, stop=[stop, "never-seen"])
    streamed = "".join(c.choices[0].text for c in complete(temperature=0, stop=stop, stream=True))
    assert cut.choices[0].text == streamed == greedy[:greedy.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_api_key(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    assert httpx2.get(f"{server}/v1/models", timeout=10).status_code == 401  # no header at all
    assert httpx2.get(f"{server}/health", timeout=10).status_code == 200  # health is open
    assert client(server).models.list().data


def test_classify(exports, gen_engine):
    from lamda_edge.runtime.classify import OnnxClassifier

    texts = ["a great film", "the quick brown fox jumps"]
    want = OnnxClassifier(exports / "cls").classify(texts)
    with running(Engine(exports / "cls")) as url:
        out = client(url).post("/classify", body={"model": MODEL, "text": texts}, cast_to=object)
        assert [row["label"] for row in out["data"]] == [p.label for p in want]
        assert [row["probability"] for row in out["data"]] == pytest.approx([p.probability for p in want])
        assert out["usage"]["prompt_tokens"] > len(texts)
        with pytest.raises(openai.NotFoundError, match="classifier"):
            client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert post(url, "/v1/classify", {"text": ""}).status_code == 400
        assert post(url, "/v1/classify", {"text": ["a", "b"], "text_pair": ["c"]}).status_code == 400


# ---- bad input -----------------------------------------------------------------------------------------------------

GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD = [
    pytest.param(b'{"messages": [', 400, None, id="malformed-json"),
    pytest.param(b"[1, 2]", 400, None, id="not-an-object"),
    pytest.param({"model": MODEL}, 400, "messages", id="missing-messages"),
    pytest.param({**GOOD, "messages": "hi"}, 400, "messages", id="messages-wrong-type"),
    pytest.param({**GOOD, "max_tokens": "ten"}, 400, "max_tokens", id="max-tokens-wrong-type"),
    pytest.param({**GOOD, "messages": [{"role": "user", "content": "hello " * 3000}]}, 400, "messages",
                 id="prompt-longer-than-context"),
    pytest.param({**GOOD, "max_tokens": 0}, 400, "max_tokens", id="max-tokens-zero"),
    pytest.param({**GOOD, "max_tokens": 5000}, 400, "max_tokens", id="max-tokens-above-context"),
    pytest.param(json.dumps({**GOOD, "temperature": float("nan")}).encode(), 400, "temperature", id="temperature-nan"),
    pytest.param({**GOOD, "temperature": -0.5}, 400, "temperature", id="temperature-negative"),
    pytest.param({**GOOD, "model": "gpt-4"}, 404, "model", id="unknown-model"),
    pytest.param({**GOOD, "logit_bias": {"5": 1}}, 400, "logit_bias", id="unsupported-parameter"),
    pytest.param({**GOOD, "messages": [{"role": "user", "content": "x" * 100_000}]}, 413, None, id="over-size-body"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_input_is_a_clean_4xx_and_the_next_request_succeeds(server, body, status, param):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        r = post(server, "/v1/chat/completions", body)
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] and len(error["message"]) > 20
    assert not [rec for rec in records if rec.exc_info or rec.levelno >= logging.ERROR]  # no traceback
    good = post(server, "/v1/chat/completions", GOOD)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1


def test_openai_client_raises_bad_request_naming_the_field(server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(server).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=-1)


# ---- under load ----------------------------------------------------------------------------------------------------


def _long_stream(url: str, started: threading.Event, out: dict, close_after_first: threading.Event | None = None,
                 max_tokens: int = LONG["max_tokens"]):
    """A long streamed completion: sets `started` at its first chunk; stops reading at `close_after_first`."""
    body = {"model": MODEL, "prompt": "hello", "stream": True, **LONG, "max_tokens": max_tokens}
    with httpx2.stream("POST", f"{url}/v1/completions", content=json.dumps(body).encode(), timeout=60) as r:
        out["status"] = r.status_code
        out["lines"] = []
        for line in r.iter_lines():
            if not line:
                continue
            out["lines"].append(line)
            if line.startswith("data:"):
                started.set()
                if close_after_first is not None:
                    close_after_first.wait(60)
                    return  # leaving the `with` closes the connection mid-stream


def test_queue_full_is_429_and_a_disconnect_frees_the_slot(gen_engine):
    with running(gen_engine, concurrency=1, queue=1) as url:
        first, second, leave = threading.Event(), threading.Event(), threading.Event()
        outs = [{}, {}]
        threads = [threading.Thread(target=_long_stream, args=(url, first, outs[0], leave), daemon=True)]
        threads[0].start()
        assert first.wait(30)
        threads.append(threading.Thread(target=_long_stream, args=(url, second, outs[1], leave), daemon=True))
        threads[1].start()
        wait_for(lambda: health(url)["queued"] == 1, what="the second request to queue")
        full = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert full.status_code == 429 and full.headers["Retry-After"] == "1"
        assert full.json()["error"]["code"] == "queue_full"
        leave.set()  # both clients hang up: the first mid-generation, the second as soon as its first chunk came
        assert second.wait(30)  # the first one's slot went to the queued one
        wait_for(lambda: health(url)["running"] == 0, what="the slots to free")
        status = health(url)
        assert status["cancelled"] == 2 and status["completed"] == 0 and status["rejected"] == 1
        for thread in threads:
            thread.join(timeout=30)
        assert post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}).status_code == 200


def test_a_client_that_leaves_a_non_streamed_request_cancels_it(gen_engine):
    with running(gen_engine, concurrency=1) as url:
        with pytest.raises(httpx2.TimeoutException):  # the client gives up after 1 s and closes its connection
            httpx2.post(f"{url}/v1/completions", content=json.dumps({"model": MODEL, "prompt": "hi", **LONG}).encode(),
                        timeout=1.0)
        wait_for(lambda: health(url)["running"] == 0, what="the slot to free")
        assert health(url)["cancelled"] == 1 and health(url)["completed"] == 0


def test_past_the_deadline_is_504(gen_engine):
    with running(gen_engine, timeout_s=0.5) as url:
        r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hello", **LONG})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        with pytest.raises(openai.APIError, match="deadline"):
            list(client(url).completions.create(model=MODEL, prompt="hello", stream=True, max_tokens=2000,
                                                extra_body={"ignore_eos": True}))
        assert health(url)["timed_out"] == 2 and health(url)["running"] == 0


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(exports):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "lamda_edge.cli", "serve", "--model", str(exports / "gen"), "--port", str(port),
               "--model-name", MODEL, "--grace", "60", "--log-level", "warning"]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url), timeout=90, what="the server to start")
        starts, outs = [threading.Event(), threading.Event()], [{}, {}]
        threads = [threading.Thread(target=_long_stream, args=(url, s, o, None, 120), daemon=True)
                   for s, o in zip(starts, outs)]
        for thread in threads:
            thread.start()
        assert all(s.wait(60) for s in starts)
        proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=120)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    log = proc.stdout.read()
    for out in outs:  # both streams ran to their end: all tokens, the finish chunk, [DONE]
        assert out["status"] == 200 and out["lines"][-1] == "data: [DONE]", log
        finish = json.loads(out["lines"][-2].removeprefix("data: "))
        assert finish["choices"][0]["finish_reason"] == "length"
    assert "Traceback" not in log and "drained" in log
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"{url}/health", timeout=5)


def _up(url: str) -> bool:
    try:
        return httpx2.get(f"{url}/health", timeout=2).status_code == 200
    except httpx2.HTTPError:
        return False


def test_cli_refuses_bad_flags_a_missing_folder_and_a_busy_port(exports, tmp_path, capsys):
    from lamda_edge.cli import main

    assert main(["serve", "--model", str(exports / "gen"), "--concurrency", "0"]) == 2
    assert main(["serve", "--model", str(exports / "gen"), "--port", "70000"]) == 2
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--model", str(exports / "gen"), "--port", str(busy.getsockname()[1]),
                     "--log-level", "critical"]) == 2
    err = capsys.readouterr().err
    assert "--concurrency should be in" in err and "not a folder" in err and "pick a free --port" in err
    assert "Traceback" not in err


# ---- the other export formats (an export each: minutes here) --------------------------------------------------------


@pytest.mark.slow
def test_genai_and_encoder_decoder_exports_serve_as_generate_runs_them(tmp_path, tiny, run_export):
    from lamda_edge.runtime.generate import load_generator
    from lamda_edge.runtime.seq2seq import OnnxSeq2Seq

    tiny.save(tmp_path / "llama", "llama", seed=4)
    run_export(tmp_path / "genai", model=tmp_path / "llama", format="genai", precision="fp32")
    want = load_generator(tmp_path / "genai").generate(PROMPT, max_new_tokens=12, stop=repetition_stop).text
    with running(Engine(tmp_path / "genai")) as url:
        out = client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": PROMPT}],
                                                  max_tokens=12, temperature=0)
        assert out.choices[0].message.content == want and want
    tiny.save(tmp_path / "bart", "bart", hidden=32, positions=32)
    run_export(tmp_path / "bart-onnx", model=tmp_path / "bart")
    s2s = OnnxSeq2Seq(tmp_path / "bart-onnx")
    want = s2s.tokenizer.decode(s2s.generate_ids(s2s.tokenizer("the quick brown fox")["input_ids"], 6),
                                skip_special_tokens=True)
    with running(Engine(tmp_path / "bart-onnx")) as url:
        out = client(url).completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=6)  # greedy
        assert out.choices[0].text == want
        with pytest.raises(openai.BadRequestError, match="greedily"):
            client(url).completions.create(model=MODEL, prompt="the quick brown fox", temperature=0.7)


@pytest.mark.slow
def test_bench_serve_runs_and_reports(exports, tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "tools" / "bench_serve.py"), "--model", str(exports / "gen"), "--clients",
               "2", "--requests", "3", "--max-tokens", "2", "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["statuses"] == {"200": 2 * 3} and result["server_exit_code"] == 0
    assert result["completion_tokens"] == 2 * 3 * 2 and result["rss_after"] > 0 and result["latency_p99_s"] > 0
    assert "requests/s" in proc.stdout and "server RSS" in proc.stdout
