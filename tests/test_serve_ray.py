"""python -m runtime.serve --ray: the same OpenAI API from 2 Ray Serve replicas on a local Ray cluster (loopback),
both answering; one replica killed during a load: no request hangs, each is answered or fails with an
error, and Serve brings the replica back."""

from __future__ import annotations

import base64
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra (starlette, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client is not installed (test extra)")
ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'prunevlm[ray]'; not in the test extra)")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'prunevlm[ray]')")

from runtime.serve import ray_app  # noqa: E402
from runtime.serve.options import ServeOptions  # noqa: E402
from tests.helpers import PROMPTS  # noqa: E402

MODEL = "llava15-k32"


@pytest.fixture(scope="module")
def ray_server(tiny_export):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = ServeOptions(tiny_export(32), port=port, model_name=MODEL, ray=True, replicas=2, threads=1)
    ray_app.start(options, blocking=False)
    try:
        yield port
    finally:
        ray_app.stop()
        ray.shutdown()


def _replicas() -> list:
    status = serve.status().applications[ray_app.APP_NAME].deployments["prunevlm"]
    return status.replica_states.get("RUNNING", 0)


def test_two_replicas_answer_and_survive_a_kill(ray_server, photos, pipeline):
    jpeg = io.BytesIO()
    Image.fromarray(photos["chelsea"]).save(jpeg, "JPEG", quality=90)
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()
    expected = pipeline(32).generate(Image.open(io.BytesIO(jpeg.getvalue())), PROMPTS[0], max_new_tokens=6)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{ray_server}/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": [{"type": "text", "text": PROMPTS[0]},
                                             {"type": "image_url", "image_url": {"url": url}}]}]

    def ask(_):
        try:
            answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
        except openai.APIError as exc:  # a request on the killed replica: an error, never a hang
            return exc
        assert answer.model_extra["prunevlm"]["token_ids"] == expected.token_ids
        return answer.model_extra["prunevlm"]["replica"]

    with ThreadPoolExecutor(8) as pool:
        replicas = set(pool.map(ask, range(24)))
    assert len(replicas) == 2 and all(isinstance(r, int) for r in replicas), replicas

    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"])
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        answers = [pool.submit(ask, i) for i in range(24)]
        time.sleep(0.3)
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        outcomes = [future.result(timeout=90) for future in answers]
    errors = [o for o in outcomes if isinstance(o, Exception)]
    print(f"during the kill: {len(outcomes) - len(errors)} answered, {len(errors)} errors "
          f"({sorted({type(e).__name__ for e in errors})}), {time.perf_counter() - started:.1f} s")
    assert len(outcomes) == 24
    for _ in range(120):
        if _replicas() == 2:
            break
        time.sleep(0.5)
    assert _replicas() == 2, "Serve did not bring the killed replica back within 60 s"
    assert isinstance(ask(0), int)
