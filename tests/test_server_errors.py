"""Every way a request can fail, injected into the engine, on every route, streaming and not: the answer is
a non-2xx JSON error with the status of the one error table (or, once a stream has started, a final SSE
event carrying that same error); and a request never makes the server open a path of the client's choosing."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from fastapi.testclient import TestClient

from moonbase.api import VL
from moonbase.data.shapes import render_scene
from moonbase.engine.engine import Engine, EngineConfig
from moonbase.finetune.store import FinetuneStore
from moonbase.server.app import ServerConfig, create_app
from moonbase.server.models import ServedModels


@pytest.fixture(scope="module")
def image_url():
    buf = io.BytesIO()
    render_scene(seed=2, max_objects=2).image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _routes(image_url: str) -> list[tuple[str, dict, bool]]:
    """(path, body, streams) for every route that runs the model."""
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What?"}]}]}
    return [
        ("/v1/caption", {"image_url": image_url}, False),
        ("/v1/caption", {"image_url": image_url, "stream": True}, True),
        ("/v1/query", {"image_url": image_url, "question": "What?"}, False),
        ("/v1/query", {"image_url": image_url, "question": "What?", "stream": True}, True),
        ("/v1/query", {"question": "What?", "reasoning": True}, False),
        ("/v1/detect", {"image_url": image_url, "object": "circle"}, False),
        ("/v1/point", {"image_url": image_url, "object": "circle"}, False),
        ("/v1/chat/completions", chat, False),
        ("/v1/chat/completions", chat | {"stream": True}, True),
        ("/v1/tuning/rollouts", {"num_rollouts": 2, "request": {"skill": "point", "image_url": image_url, "object": "o"}}, False),
    ]


def _client(tiny, tmp_path, engine_cfg=EngineConfig(kv_memory_mb=8), **cfg):
    vl = VL(tiny, engine=Engine(tiny, engine_cfg))
    app = create_app(ServedModels({"tiny": vl}, "tiny"), ServerConfig(**cfg), finetunes=FinetuneStore(tmp_path))
    client = TestClient(app)
    fid = client.post("/v1/tuning/finetunes", json={"name": "errors", "rank": 8}).json()["finetune_id"]
    return client, vl, fid


def _error_of(response, streams: bool) -> dict:
    """The error a response carries: its JSON body, or the last event of a stream that had started."""
    if not streams or response.status_code != 200:
        assert response.headers["content-type"].startswith("application/json"), response.text
        body = response.json()["error"]
        assert body["code"] == response.status_code
        return body
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    assert "error" in events[-1], events[-1]
    return events[-1]["error"]


def _check_every_route(client, fid, image_url, status: int, kind: str, message: str) -> None:
    for path, body, streams in _routes(image_url):
        body = body | {"finetune_id": fid} if "tuning" in path else body
        response = client.post(path, json=body)
        assert response.status_code in ((200, status) if streams else (status,)), (path, response.text)
        error = _error_of(response, streams)
        assert (error["code"], error["type"]) == (status, kind) and message in error["message"], (path, error)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize(
    "failure, status, kind, message",
    [
        (Boom("the forward broke"), 500, "internal_error", "Boom: the forward broke"),
        (MemoryError("host memory exhausted"), 503, "overloaded_error", "host memory exhausted"),
    ],
)
def test_a_failed_forward_is_a_json_error_on_every_route(tiny, tmp_path, image_url, failure, status, kind, message):
    client, vl, fid = _client(tiny, tmp_path)

    def broken(*_, **__):
        raise failure

    vl.engine.runner.forward = broken
    _check_every_route(client, fid, image_url, status, kind, message)
    assert vl.engine.stats["in_flight"] == 0 and vl.engine.stats["running"] == 0  # nothing left behind


def test_a_request_the_kv_pool_cannot_hold_is_a_413_on_every_route(tiny, tmp_path, image_url):
    client, vl, fid = _client(tiny, tmp_path, EngineConfig(kv_memory_mb=0.001, block_size=8))
    _check_every_route(client, fid, image_url, 413, "capacity_error", "KV pool")
    assert vl.engine.pool.n_free == vl.engine.pool.n_blocks


def test_a_request_past_its_deadline_is_a_504_on_every_route_and_is_freed(tiny, tmp_path, image_url):
    client, vl, fid = _client(tiny, tmp_path, timeout_s=0.2)
    forward = vl.engine.runner.forward

    def slow(*args, **kw):  # every request needs at least one forward: none finishes within 0.2 s
        time.sleep(0.3)
        return forward(*args, **kw)

    vl.engine.runner.forward = slow
    _check_every_route(client, fid, image_url, 504, "timeout_error", "did not finish")
    deadline = time.time() + 10
    while vl.engine.stats["in_flight"] and time.time() < deadline:  # cancelled in the engine, freed at its next step
        time.sleep(0.05)
    assert vl.engine.stats["in_flight"] == 0


def test_a_request_cancelled_in_the_engine_is_a_499(tiny, tmp_path, image_url):
    client, vl, fid = _client(tiny, tmp_path)
    submit = vl.submit

    def cancelled(request):
        handle = submit(request)
        handle.cancel()
        return handle

    vl.submit = cancelled
    _check_every_route(client, fid, image_url, 499, "client_closed_request", "cancelled")


def test_adapter_paths_from_requests_are_refused_and_never_opened(tiny, tmp_path, image_url, monkeypatch):
    from moonbase.model import lora

    opened = []
    real = lora.load_adapter

    def recording(path, cfg):
        opened.append(str(path))
        return real(path, cfg)

    monkeypatch.setattr("moonbase.engine.adapters.load_adapter", recording)
    allowed = tmp_path / "adapters"
    (allowed / "ok").mkdir(parents=True)
    import torch

    from .helpers import random_adapter, raw_variant_state

    torch.save(raw_variant_state(random_adapter(tiny.cfg.text, 4, 3, "x")), allowed / "ok" / "final.pt")
    (tmp_path / "outside").mkdir()
    torch.save(raw_variant_state(random_adapter(tiny.cfg.text, 4, 4, "y")), tmp_path / "outside" / "final.pt")
    (allowed / "escape").symlink_to(tmp_path / "outside")
    point = {"image_url": image_url, "object": "circle"}
    for allow in (None, allowed):
        client, _, _ = _client(tiny, tmp_path / str(allow is None), allow_adapter_paths=allow)
        paths = ["/etc/passwd", "../../../../etc/shadow", "/etc", str(tmp_path / "outside")]
        for variant in paths + (["escape"] if allow else ["~/x"]):  # escape: a symlink inside the directory, leading out
            for body in (point | {"variant": variant}, point | {"settings": {"variant": variant}}):
                response = client.post("/v1/point", json=body)
                assert response.status_code == 400, (allow, variant, response.text)
                message = response.json()["error"]["message"]
                assert "etc" not in message and str(tmp_path) not in message and "passwd" not in message
        for name in ("README.md", "escape"):  # a bare name is a path only inside the allowed directory
            response = client.post("/v1/point", json=point | {"variant": name})
            assert response.status_code == (400 if allow and name == "escape" else 404), (allow, name, response.text)
        assert client.post("/v1/point", json=point | {"model": "tiny/01H0000000000000000000000A@3"}).status_code == 404
    assert opened == []  # nothing outside the allowed directory was opened, and nothing inside was asked for yet
    client, _, _ = _client(tiny, tmp_path / "allowing", allow_adapter_paths=allowed)
    assert client.post("/v1/point", json=point | {"variant": "ok"}).status_code == 200
    assert client.post("/v1/point", json=point | {"variant": str(allowed / "ok")}).status_code == 200
    assert opened == [str(allowed / "ok")]  # inside the directory: loaded once, then kept by name


def test_boxes_and_points_are_clipped_to_the_image_on_the_http_api(tiny, tmp_path, image_url):
    client, _, _ = _client(tiny, tmp_path)
    seen = 0
    for seed in range(6):
        buf = io.BytesIO()
        render_scene(seed=seed, max_objects=4).image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        for what in ("circle", "red shape", "star"):
            boxes = client.post("/v1/detect", json={"image_url": url, "object": what}).json()["objects"]
            points = client.post("/v1/point", json={"image_url": url, "object": what}).json()["points"]
            values = [v for b in boxes for v in b.values()] + [v for p in points for v in p.values()]
            assert all(0.0 <= v <= 1.0 for v in values), values
            seen += len(values)
    assert seen > 50
