"""python -m runtime.serve: the official openai client against a server on 127.0.0.1 (a free port), answers
equal to Pipeline.generate's, exact usage, a bounded load test with batching engaged, every bad request
followed by a good one, auth, image sources. Servers bind loopback only and stop at the end of the module."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (starlette, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed (test extra)")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from runtime.pipeline import Pipeline  # noqa: E402
from runtime.serve.app import create_app  # noqa: E402
from runtime.serve.options import ServeOptions  # noqa: E402
from tests.helpers import PROMPTS  # noqa: E402

MODEL = "llava15-k32"
KEY = "test-key-123"


def _jpeg(array) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, "JPEG", quality=90)
    return out.getvalue()


def _data_url(data: bytes, kind: str = "jpeg") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def _messages(prompt: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": url}}]}]


@contextlib.contextmanager
def _server(options: ServeOptions, pipeline):
    """An in-process uvicorn server on 127.0.0.1 and a free port, stopped when the block ends."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(options, pipeline)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "the test server did not start within 10 s"
    try:
        yield port, app.state.server
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def images(photos, tmp_path_factory):
    """Two JPEG photos, as bytes and as the PIL images Pipeline.generate gets for the reference."""
    return {name: _jpeg(photos[name]) for name in ("chelsea", "coffee")}


@pytest.fixture(scope="module")
def allowed(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("serve")
    inside, outside = root / "allowed", root / "outside"
    inside.mkdir()
    outside.mkdir()
    (inside / "cat.jpg").write_bytes(images["chelsea"])
    (outside / "secret.jpg").write_bytes(images["coffee"])
    (inside / "escape.jpg").symlink_to(outside / "secret.jpg")
    (inside / "escape_dir").symlink_to(outside)
    return inside, outside


@pytest.fixture(scope="module")
def served(tiny_export, allowed):
    """(port, server) of the main test server: no key, 2 MiB bodies, 1 MiB images, files under `allowed`."""
    options = ServeOptions(tiny_export(32), model_name=MODEL, max_batch=8, max_wait_ms=20,
                           allow_image_dir=allowed[0], max_body_bytes=2 << 20, max_image_bytes=1 << 20)
    with _server(options, Pipeline.load(tiny_export(32))) as running:
        yield running


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served[0]}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(pipeline, images):
    """(image name, prompt, max_tokens) -> Pipeline.generate's Result on the same decoded image (greedy)."""
    cache = {}

    def get(name: str, prompt: str, max_tokens: int):
        if (name, prompt, max_tokens) not in cache:
            image = Image.open(io.BytesIO(images[name]))
            cache[name, prompt, max_tokens] = pipeline(32).generate(image, prompt, max_new_tokens=max_tokens)
        return cache[name, prompt, max_tokens]

    return get


def _good(client, images, reference, prompt=PROMPTS[0], name="chelsea", max_tokens=6):
    answer = client.chat.completions.create(model=MODEL, messages=_messages(prompt, _data_url(images[name])),
                                            max_tokens=max_tokens, temperature=0)
    expected = reference(name, prompt, max_tokens)
    assert answer.model_extra["prunevlm"]["token_ids"] == expected.token_ids, (prompt, name)
    assert answer.choices[0].message.content == expected.text
    return answer


def test_answer_equals_pipeline_generate(client, images, reference):
    for name, prompt in (("chelsea", PROMPTS[0]), ("coffee", PROMPTS[1])):
        expected = reference(name, prompt, 12)
        answer = client.chat.completions.create(model=MODEL, messages=_messages(prompt, _data_url(images[name])),
                                                max_tokens=12, temperature=0)
        extras = answer.model_extra["prunevlm"]
        assert extras["token_ids"] == expected.token_ids
        assert answer.choices[0].message.content == expected.text
        assert answer.choices[0].finish_reason == ("stop" if expected.finish_reason == "eos" else "length")
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
            expected.prompt_tokens, len(expected.token_ids), expected.prompt_tokens + len(expected.token_ids))
        assert extras["kept_tokens"] == 32 and extras["kept_indices"] == expected.kept_indices.tolist()
        assert {"vision_s", "prefill_s", "time_to_first_token_s"} <= set(extras["timings"])

        stream = client.chat.completions.create(model=MODEL, messages=_messages(prompt, _data_url(images[name])),
                                                max_tokens=12, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected.text
        assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens
        assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
        last = [c for c in chunks if c.choices][-1]
        assert last.choices[0].finish_reason == answer.choices[0].finish_reason
        assert last.model_extra["prunevlm"]["token_ids"] == expected.token_ids


def test_stop_string_and_per_request_max_tokens(client, images, reference):
    expected = reference("chelsea", PROMPTS[0], 12)
    stop = expected.text[len(expected.text) // 2:][:3]
    assert stop.strip(), f"the reference answer {expected.text!r} has no usable stop string"
    cut = expected.text[:expected.text.index(stop)]
    for stream in (False, True):
        answer = client.chat.completions.create(model=MODEL, messages=_messages(PROMPTS[0], _data_url(images["chelsea"])),
                                                max_tokens=12, stop=[stop], stream=stream, temperature=0)
        if stream:
            chunks = [c for c in answer if c.choices]
            text, reason = "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = answer.choices[0].message.content, answer.choices[0].finish_reason
        assert (text, reason) == (cut, "stop"), f"stop={stop!r} in {expected.text!r}"
    short = _good(client, images, reference, max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"


LOAD_REQUESTS = 200  # the bounded load test: 200 requests from 8 concurrent clients


def test_bounded_load_engages_batching(client, images, reference, served):
    """200 requests from 8 concurrent clients, mixed images, prompts and lengths: all correct, and the metrics
    show batches of more than one request."""
    jobs = [(("chelsea", "coffee")[i % 2], PROMPTS[i % 3], 4 + i % 5) for i in range(LOAD_REQUESTS)]
    for job in set(jobs):
        reference(*job)
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: client.chat.completions.create(
            model=MODEL, messages=_messages(job[1], _data_url(images[job[0]])), max_tokens=job[2]), jobs))
    took = time.perf_counter() - started
    for job, answer in zip(jobs, answers):
        assert answer.model_extra["prunevlm"]["token_ids"] == reference(*job).token_ids, job
        assert answer.usage.prompt_tokens == reference(*job).prompt_tokens
    families = {f.name: f for f in text_string_to_metric_families(_get(served[0], "/metrics")[1].decode())}
    sizes = {s.labels["le"]: s.value for s in families["prunevlm_batch_size"].samples if s.name.endswith("_bucket")}
    batches = families["prunevlm_batch_size"].samples
    count = next(s.value for s in batches if s.name.endswith("_count"))
    print(f"{LOAD_REQUESTS} requests in {took:.1f} s, {count:.0f} batches, {count - sizes['1.0']:.0f} of more than one request")
    assert sizes["1.0"] < count, f"every batch had one request: {sizes}"
    assert max(s.value for s in families["prunevlm_queue_length"].samples) == 0


def _post(port: int, body: bytes, path: str = "/v1/chat/completions", headers: dict | None = None,
          method: str = "POST") -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def _get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _body(images, prompt=PROMPTS[0], url=None, **fields) -> dict:
    return {"model": MODEL, "messages": _messages(prompt, url or _data_url(images["chelsea"])), "max_tokens": 4, **fields}


BAD = {  # name -> (body maker (images -> bytes), status, param or None)
    "malformed JSON": (lambda im: b'{"model": "llava15-k32", "messages": [', 400, None),
    "not an object": (lambda im: b"[1, 2]", 400, None),
    "not UTF-8": (lambda im: b'{"model": "\xff"}', 400, None),
    "missing messages": (lambda im: json.dumps({"model": MODEL}).encode(), 400, "messages"),
    "missing model": (lambda im: json.dumps({"messages": _messages("hi", _data_url(im["chelsea"]))}).encode(), 400, "model"),
    "model not a string": (lambda im: json.dumps({**_body(im), "model": 3}).encode(), 400, "model"),
    "messages not a list": (lambda im: json.dumps({**_body(im), "messages": "hi"}).encode(), 400, "messages"),
    "max_tokens a string": (lambda im: json.dumps(_body(im, max_tokens="5")).encode(), 400, "max_tokens"),
    "max_tokens 0": (lambda im: json.dumps(_body(im, max_tokens=0)).encode(), 400, "max_tokens"),
    "max_tokens huge": (lambda im: json.dumps(_body(im, max_tokens=10**9)).encode(), 400, "max_tokens"),
    "temperature a string": (lambda im: json.dumps(_body(im, temperature="hot")).encode(), 400, "temperature"),
    "top_p 0": (lambda im: json.dumps(_body(im, temperature=1, top_p=0)).encode(), 400, "top_p"),
    "stream not a bool": (lambda im: json.dumps(_body(im, stream="yes")).encode(), 400, "stream"),
    "stop not strings": (lambda im: json.dumps(_body(im, stop=[1])).encode(), 400, "stop"),
    "n 2": (lambda im: json.dumps(_body(im, n=2)).encode(), 400, "n"),
    "unknown model": (lambda im: json.dumps({**_body(im), "model": "gpt-4o"}).encode(), 404, "model"),
    "system turn": (lambda im: json.dumps({**_body(im), "messages": [{"role": "system", "content": "x"}]
                                           + _messages("hi", _data_url(im["chelsea"]))}).encode(), 400, "messages"),
    "no image": (lambda im: json.dumps({**_body(im), "messages": [{"role": "user", "content": "hi"}]}).encode(), 400,
                 "messages[0].content"),
    "two images": (lambda im: json.dumps({**_body(im), "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": _data_url(im["chelsea"])}},
        {"type": "image_url", "image_url": {"url": _data_url(im["coffee"])}}]}]}).encode(), 400, "messages[0].content"),
    "part of unknown type": (lambda im: json.dumps({**_body(im), "messages": [{"role": "user", "content": [
        {"type": "audio", "audio": "x"}]}]}).encode(), 400, "messages[0].content[0]"),
    "not an image": (lambda im: json.dumps(_body(im, url=_data_url(b"hello, not an image"))).encode(), 400,
                     "messages[0].content.image_url"),
    "bad base64": (lambda im: json.dumps(_body(im, url="data:image/png;base64,@@@@")).encode(), 400,
                   "messages[0].content.image_url"),
    "image too large": (lambda im: json.dumps(_body(im, url=_data_url(b"\0" * (1200 << 10)))).encode(), 413,
                        "messages[0].content.image_url"),
    "body too large": (lambda im: json.dumps(_body(im, prompt="x" * (3 << 20))).encode(), 413, None),
    "prompt too long": (lambda im: json.dumps(_body(im, prompt="a b " * 5000)).encode(), 400, "messages"),
    "empty prompt": (lambda im: json.dumps(_body(im, prompt="  ")).encode(), 400, "messages"),
    "control token in prompt": (lambda im: json.dumps(_body(im, prompt="hi <image> there")).encode(), 400, "messages"),
    "remote URL": (lambda im: json.dumps(_body(im, url="http://127.0.0.1:9/cat.jpg")).encode(), 400,
                   "messages[0].content.image_url"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_then_good(name, served, client, images, reference):
    make, status, param = BAD[name]
    got, body = _post(served[0], make(images))
    assert got == status, f"{name}: {got} {body}"
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"], error
    assert error["param"] == param, error
    _good(client, images, reference)


def test_routes_and_methods(served, client):
    assert _get(served[0], "/health")[0] == 200
    assert [m.id for m in client.models.list()] == [MODEL]
    status, body = _post(served[0], b"", path="/v1/nothing")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = _post(served[0], b"", method="GET")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"


def test_image_files_only_inside_allowed_dir(served, client, images, reference, allowed):
    inside, outside = allowed
    for url in (str(inside / "cat.jpg"), (inside / "cat.jpg").as_uri(), "cat.jpg"):  # absolute, file://, relative
        answer = client.chat.completions.create(model=MODEL, messages=_messages(PROMPTS[0], url), max_tokens=6)
        assert answer.model_extra["prunevlm"]["token_ids"] == reference("chelsea", PROMPTS[0], 6).token_ids, url
    for url in (str(outside / "secret.jpg"), str(inside / "escape.jpg"), str(inside / "escape_dir" / "secret.jpg"),
                str(inside / ".." / "outside" / "secret.jpg"), "/etc/passwd", (outside / "secret.jpg").as_uri()):
        status, body = _post(served[0], json.dumps(_body(images, url=url)).encode())
        assert (status, body["error"]["code"]) == (403, "image_source_refused"), (url, body)
        _good(client, images, reference)


def test_client_disconnect_cancels_its_row(served, client, images, reference):
    """A stream of up to 4000 tokens dropped after its first chunks: the worker stops that row, so the next
    request is answered at once instead of after the abandoned answer (about 30 s of decoding here)."""
    connection = http.client.HTTPConnection("127.0.0.1", served[0], timeout=60)
    body = json.dumps(_body(images, max_tokens=4000, stream=True)).encode()
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    response.readline()
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    started = time.perf_counter()
    _good(client, images, reference)
    assert time.perf_counter() - started < 10, "the abandoned stream kept the worker busy"


def test_api_key(tiny_export, images, reference, monkeypatch):
    monkeypatch.setenv("PRUNEVLM_TEST_KEY", KEY)
    options = ServeOptions(tiny_export(32), model_name=MODEL, api_key_env="PRUNEVLM_TEST_KEY")
    with _server(options, Pipeline.load(tiny_export(32))) as (port, _):
        base = f"http://127.0.0.1:{port}/v1"
        for key in ("wrong", KEY + "x", ""):
            with pytest.raises(openai.AuthenticationError) as refused:
                openai.OpenAI(base_url=base, api_key=key or "-", max_retries=0).models.list()
            assert refused.value.status_code == 401
        assert _post(port, json.dumps(_body(images)).encode())[0] == 401  # no Authorization header at all
        assert _get(port, "/metrics")[0] == 401
        assert _get(port, "/health")[0] == 200  # liveness probes need no key
        _good(openai.OpenAI(base_url=base, api_key=KEY, max_retries=0), images, reference)


def test_options_refuse_bad_values(tiny_export, tmp_path):
    from contract.errors import InputError

    for fields in ({"max_batch": 0}, {"max_wait_ms": -1}, {"port": 70000}, {"replicas": 2},
                   {"api_key_env": "PRUNEVLM_SURELY_UNSET_VAR"}, {"allow_image_dir": tmp_path / "nope"}):
        os.environ.pop("PRUNEVLM_SURELY_UNSET_VAR", None)
        with pytest.raises(InputError):
            ServeOptions(tiny_export(32), **fields)
