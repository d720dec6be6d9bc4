"""The HTTP server against the official `moondream` client (2.6.1, installed with --no-deps): every
result equals the in-process API's on the same model with greedy settings; errors are non-2xx JSON."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import moondream as md  # the official client: pip install --no-deps moondream==2.6.1
import numpy as np
import pytest
import torch
from PIL import Image

from moonbase.api import VL
from moonbase.data.shapes import render_scene
from moonbase.server.app import create_app
from moonbase.server.models import ServedModels

from .serving import jpeg_roundtrip, serving

GREEDY = {"temperature": 0.0, "max_tokens": 10}


@pytest.fixture(scope="module")
def served(tiny):
    vl = VL(tiny)
    with serving(create_app(ServedModels({"tiny": vl}, "tiny")), 21020) as url:
        yield vl, url


@pytest.fixture(scope="module")
def image():
    return render_scene(seed=11, max_objects=3).image


def test_official_client_gets_the_in_process_answers(served, image):
    vl, base = served
    client = md.vl(endpoint=base + "/v1")
    local = jpeg_roundtrip(image)
    for length in ("short", "normal", "long"):
        want = vl.caption(local, length, settings=GREEDY)["caption"]
        assert client.caption(image, length, settings=GREEDY)["caption"] == want
        assert "".join(client.caption(image, length, stream=True, settings=GREEDY)["caption"]) == want
    want = vl.query(local, "How many circles?", settings=GREEDY)["answer"]
    assert client.query(image, "How many circles?", settings=GREEDY)["answer"] == want
    assert "".join(client.query(image, "How many circles?", stream=True, settings=GREEDY)["answer"]) == want
    got = client.query(image, "Where?", reasoning=True, settings=GREEDY)
    assert got == {k: v for k, v in vl.query(local, "Where?", reasoning=True, settings=GREEDY).items()}
    refs = [[0.5, 0.5]]
    assert client.query(image, "What?", spatial_refs=refs, settings=GREEDY) == vl.query(
        local, "What?", spatial_refs=refs, settings=GREEDY
    )
    assert client.query(None, "Hi?", settings=GREEDY) == vl.query(None, "Hi?", settings=GREEDY)
    assert client.detect(image, "circle", settings={"max_objects": 3}) == vl.detect(local, "circle", settings={"max_objects": 3})
    assert client.point(image, "circle", settings={"max_objects": 3}) == vl.point(local, "circle", settings={"max_objects": 3})


def _data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _png(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 100, 50)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_TRUNCATED = "data:image/png;base64," + base64.b64encode(base64.b64decode(_png(64, 64).split(",")[1])[:60]).decode()
_HUGE = _png(9000, 8000)  # 72 MP: over the default 64 MP limit (a decompression bomb)
BAD = [  # (path, body, status): every one must get this 4xx JSON error, never a 5xx
    ("/v1/caption", {}, 400),
    ("/v1/caption", {"image_url": None}, 400),
    ("/v1/caption", {"image_url": 42}, 400),
    ("/v1/caption", {"image_url": ["IMG"]}, 400),
    ("/v1/caption", {"image_url": ""}, 400),
    ("/v1/caption", {"image_url": "data:image/png;base64,"}, 400),
    ("/v1/caption", {"image_url": "data:image/png;base64,@@@"}, 400),
    ("/v1/caption", {"image_url": "data:image/png"}, 400),
    ("/v1/caption", {"image_url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}, 400),
    ("/v1/caption", {"image_url": _TRUNCATED}, 400),
    ("/v1/caption", {"image_url": _png(1, 1)[:-4] + "!!!!"}, 400),
    ("/v1/caption", {"image_url": _HUGE}, 400),
    ("/v1/caption", {"image_url": "https://example.com/cat.jpg"}, 400),
    ("/v1/caption", {"image_url": "http://169.254.169.254/latest"}, 400),
    ("/v1/caption", {"image_url": "file:///etc/passwd"}, 400),
    ("/v1/caption", {"image_url": "/etc/passwd"}, 400),
    ("/v1/caption", {"image_url": "IMG", "length": "huge"}, 400),
    ("/v1/caption", {"image_url": "IMG", "length": 3}, 400),
    ("/v1/caption", {"image_url": "IMG", "stream": "yes"}, 400),
    ("/v1/caption", {"image_url": "IMG", "settings": "hot"}, 400),
    ("/v1/caption", {"image_url": "IMG", "settings": {"temperature": -1}}, 400),
    ("/v1/caption", {"image_url": "IMG", "settings": {"temperature": "warm"}}, 400),
    ("/v1/caption", {"image_url": "IMG", "settings": {"temperature": None, "top_p": 0}}, 400),
    ("/v1/caption", {"image_url": "IMG", "settings": {"top_p": 1.5}}, 400),
    ("/v1/caption", {"image_url": "IMG", "settings": {"max_tokens": 0}}, 400),
    ("/v1/caption", {"image_url": "IMG", "settings": {"max_tokens": -5}}, 400),
    ("/v1/caption", {"image_url": "IMG", "settings": {"max_tokens": 2.5}}, 400),
    ("/v1/caption", {"image_url": "IMG", "settings": {"max_tokens": True}}, 400),
    ("/v1/caption", {"image_url": "IMG", "settings": {"seed": "x"}}, 400),
    ("/v1/caption", {"image_url": "IMG", "settings": {"bogus": 1}}, 400),
    ("/v1/caption", {"image_url": "IMG", "temperature": -3}, 400),
    ("/v1/caption", {"image_url": "IMG", "model": "nope"}, 404),
    ("/v1/caption", {"image_url": "IMG", "model": "tiny/01ABC@5"}, 404),
    ("/v1/caption", {"image_url": "IMG", "variant": "no-such-adapter"}, 404),
    ("/v1/caption", {"image_url": "IMG", "settings": {"variant": "no-such-adapter"}}, 404),
    ("/v1/query", {"image_url": "IMG"}, 400),
    ("/v1/query", {"image_url": "IMG", "question": ""}, 400),
    ("/v1/query", {"image_url": "IMG", "question": 7}, 400),
    ("/v1/query", {"image_url": "IMG", "question": "x", "reasoning": "sure"}, 400),
    ("/v1/query", {"question": "x", "spatial_refs": [[0.5, 0.5]]}, 400),
    ("/v1/query", {"question": "x", "image_url": "IMG", "spatial_refs": [[2, 0.5]]}, 400),
    ("/v1/query", {"question": "x", "image_url": "IMG", "spatial_refs": [[0.5]]}, 400),
    ("/v1/query", {"question": "x", "image_url": "IMG", "spatial_refs": [[0.6, 0.6, 0.2, 0.2]]}, 400),
    ("/v1/query", {"question": "x", "image_url": "IMG", "spatial_refs": "middle"}, 400),
    ("/v1/query", {"question": "x" * 20000, "image_url": "IMG"}, 400),
    ("/v1/detect", {"image_url": "IMG"}, 400),
    ("/v1/detect", {"image_url": "IMG", "object": ""}, 400),
    ("/v1/detect", {"image_url": "IMG", "object": "   "}, 400),
    ("/v1/detect", {"image_url": "IMG", "object": ["cat"]}, 400),
    ("/v1/detect", {"object": "cat"}, 400),
    ("/v1/detect", {"image_url": "IMG", "object": "cat", "settings": {"max_objects": 0}}, 400),
    ("/v1/point", {"image_url": "IMG", "object": "x", "settings": {"max_objects": 0}}, 400),
    ("/v1/point", {"image_url": "IMG", "object": "x", "spatial_refs": [[0.1, 0.2, 0.3]]}, 400),
    ("/v1/segment", {"image_url": "IMG", "object": "cat"}, 501),
    ("/v1/segment", {"image_url": "IMG", "object": "cat", "stream": True}, 501),
    ("/v1/chat/completions", {}, 400),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]}, 400),
    ("/v1/nothing", {}, 404),
]


@pytest.mark.parametrize(("path", "body", "status"), BAD, ids=[f"{i}:{p}" for i, (p, _, _) in enumerate(BAD)])
def test_bad_requests_get_a_json_error_status(served, image, path, body, status):
    _, base = served
    body = {k: (_data_url(image) if v == "IMG" else v) for k, v in body.items()}
    r = httpx.post(base + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    assert r.json().get("error", {}).get("message") or r.json().get("detail")
    assert httpx.get(base + "/health").json()["status"] == "ok"


def test_odd_unicode_is_answered_not_crashed(served, image):
    _, base = served
    for text in ("\u0000", "\U0001f600 emoji", "\u202e reversed", "ℌ𝔢𝔩𝔩𝔬", "\u3042" * 50, "e\u0301" * 30):
        body = {"image_url": _data_url(image), "question": text, "settings": GREEDY}
        assert httpx.post(base + "/v1/query", json=body, timeout=60).status_code == 200
    lone_surrogate = b'{"question": "\\ud83d", "image_url": "x"}'  # valid JSON, not encodable as UTF-8
    r = httpx.post(base + "/v1/query", content=lone_surrogate, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400


def test_malformed_json_is_a_400(served):
    _, base = served
    r = httpx.post(base + "/v1/caption", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]


def _app(vl, **cfg):
    from fastapi.testclient import TestClient

    from moonbase.server.app import ServerConfig

    return TestClient(create_app(ServedModels({"tiny": vl}, "tiny"), ServerConfig(**cfg)))


def test_api_key_is_required_when_set(tiny, image):
    client = _app(VL(tiny), api_key="s3cret")
    body = {"image_url": _data_url(image), "settings": GREEDY}
    assert client.post("/v1/caption", json=body).status_code == 401
    assert client.post("/v1/caption", json=body, headers={"X-Moondream-Auth": "wrong"}).status_code == 401
    assert client.post("/v1/caption", json=body, headers={"X-Moondream-Auth": "s3cret"}).status_code == 200
    assert client.post("/v1/caption", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200  # health needs no key


def test_oversized_bodies_full_queues_and_timeouts(tiny, image):
    body = {"image_url": _data_url(image), "settings": GREEDY}
    small = _app(VL(tiny), max_body_mb=0.001)
    r = small.post("/v1/caption", json=body)
    assert r.status_code == 413 and r.json()["error"]["message"]
    full = _app(VL(tiny), max_in_flight=0)
    r = full.post("/v1/caption", json=body)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    vl = VL(tiny)
    r = _app(vl, timeout_s=1e-9).post("/v1/caption", json=body)
    assert r.status_code == 504 and "within" in r.json()["error"]["message"]
    deadline = time.time() + 10
    while (vl.engine.scheduler.running or vl.engine.scheduler.waiting) and time.time() < deadline:
        time.sleep(0.02)
    assert not vl.engine.scheduler.running and not vl.engine.scheduler.waiting  # the timed-out request was freed


def test_responses_carry_real_token_counts_and_timings(served, image):
    vl, base = served
    body = {"image_url": _data_url(image), "question": "How many?", "settings": GREEDY}
    first = httpx.post(base + "/v1/query", json=body, timeout=30).json()["_stats"]
    again = httpx.post(base + "/v1/query", json=body, timeout=30).json()["_stats"]
    assert first["image_tokens"] == vl.model.cfg.prefix_len and first["input_tokens"] > 3
    assert 1 <= first["output_tokens"] <= GREEDY["max_tokens"] + 1 and 0 < first["ttft_ms"] <= first["total_ms"]
    assert again["image_cached"]  # the second question about the image skipped vision and prefill
    with httpx.stream(
        "POST", base + "/v1/caption", json={"image_url": _data_url(image), "stream": True, "settings": GREEDY}
    ) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1]["completed"] and events[-1]["_stats"]["output_tokens"] >= 1


def test_stats_and_metrics_count_what_happened(tiny, image):
    client = _app(VL(tiny))
    client.post("/v1/detect", json={"image_url": _data_url(image), "object": "circle"})
    client.post("/v1/detect", json={"image_url": "data:image/png;base64,@@", "object": "circle"})
    stats = client.get("/v1/stats").json()
    assert stats["responses"]["/v1/detect"] == {"200": 1, "400": 1}
    assert stats["models"]["tiny"]["prefix_cache_entries"] == 1
    metrics = client.get("/metrics").text
    assert 'moonbase_responses_total{path="/v1/detect",status="400"} 1' in metrics
    assert 'moonbase_engine_kv_blocks{model="tiny"}' in metrics


def test_chat_completions_answer_like_query(served, image):
    vl, base = served
    client = md.vl(endpoint=base + "/v1")
    url = _data_url(image)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "How many?"}]},
    ]
    want = vl.query(np.asarray(image.convert("RGB")), "How many?", settings=GREEDY)["answer"]
    got = client.chat(messages, settings=GREEDY)
    assert got["message"]["content"] == want and got["finish_reason"] in ("stop", "length")
    assert "".join(client.chat(messages, stream=True, settings=GREEDY)["message"]) == want
    r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
    assert r.status_code == 400
    usage = httpx.post(base + "/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "temperature": 0}).json()[
        "usage"
    ]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["completion_tokens"] >= 1


def test_fuzzed_request_bodies_never_get_a_server_error(tiny):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = _app(VL(tiny), timeout_s=30)
    small = _png(20, 16)
    junk = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 5),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
        st.lists(st.integers(), max_size=3),
    )
    value = {
        "image_url": st.one_of(st.just(small), st.text(max_size=12), junk),
        "question": st.one_of(st.text(max_size=20), junk),
        "object": st.one_of(st.sampled_from(["circle", "red shape"]), st.text(max_size=10), junk),
        "length": st.one_of(st.sampled_from(["short", "normal", "long"]), junk),
        "stream": st.one_of(st.booleans(), junk),
        "reasoning": st.one_of(st.booleans(), junk),
        "spatial_refs": st.one_of(st.lists(st.lists(st.floats(-1, 2), min_size=1, max_size=5), max_size=3), junk),
        "model": st.one_of(st.sampled_from(["tiny", "moondream3-preview", "tiny/x@1"]), junk),
        "settings": st.one_of(
            st.fixed_dictionaries(
                {"max_tokens": st.integers(-2, 6)},
                optional={"temperature": st.floats(-1, 2), "top_p": st.floats(-0.5, 1.5), "max_objects": st.integers(-1, 3)},
            ),
            junk,
        ),
    }
    bodies = st.fixed_dictionaries({}, optional=value)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(["/v1/caption", "/v1/query", "/v1/detect", "/v1/point"]), body=bodies)
    def check(path, body):
        if "settings" in body and isinstance(body["settings"], dict) and "max_tokens" not in body["settings"]:
            body["settings"]["max_tokens"] = 4
        r = client.post(path, json=body)
        assert r.status_code < 500, (path, body, r.text)
        if r.status_code != 200:
            assert r.json()["error"]["message"]

    check()


def test_a_client_that_goes_away_frees_its_sequence(tiny, image):
    vl = VL(tiny)
    real_step = vl.engine.step

    def slow_step():  # 40 tokens now take over 4 s
        time.sleep(0.1)
        return real_step()

    vl.engine.step = slow_step
    with serving(create_app(ServedModels({"tiny": vl}, "tiny")), 25020) as url:
        body = {"image_url": _data_url(image), "length": "long", "settings": {"max_tokens": 40, "temperature": 0}}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/caption", json=body, timeout=0.5)
        deadline = time.time() + 1.5  # well before the 4 s the answer would take
        while vl.engine.scheduler.running and time.time() < deadline:
            time.sleep(0.02)
        assert not vl.engine.scheduler.running and not vl.engine.scheduler.waiting


def test_model_names_aliases_and_adapters(tiny, image, tmp_path):
    from .helpers import random_adapter, raw_variant_state

    vl = VL(tiny)
    client = _app(vl)
    body = {"image_url": _data_url(image), "object": "circle", "settings": {"max_objects": 2}}
    base = client.post("/v1/point", json=body).json()["points"]
    assert (
        client.post("/v1/point", json={**body, "model": "moondream3-preview"}).json()["points"] == base
    )  # the tuning client's alias
    torch.save(raw_variant_state(random_adapter(tiny.cfg.text, 4, 3, "x", scale=0.5)), tmp_path / "final.pt")
    refused = client.post("/v1/point", json={**body, "variant": str(tmp_path)})  # a path: only where the server allows
    assert refused.status_code == 400 and str(tmp_path) not in refused.text
    allowing = _app(vl, allow_adapter_paths=tmp_path)
    adapted = allowing.post("/v1/point", json={**body, "variant": str(tmp_path)})  # a variant directory on disk
    want = vl.point(np.asarray(image.convert("RGB")), "circle", settings={"max_objects": 2, "variant": str(tmp_path)})
    assert adapted.status_code == 200 and adapted.json()["points"] == want["points"]


def test_engine_flags_of_serve_take_effect_and_stats_show_them(tmp_path):
    from .serving import serve_processes

    flags = ["--kv-memory", "3MB", "--prefix-cache", "1MB", "--max-batch", "8", "--max-step-tokens", "2048"]
    flags += ["--max-crops", "1", "--no-pipeline", "--finetunes", "none"]
    with serve_processes([flags], tmp_path, 23040) as (url,):
        engine = httpx.get(url + "/v1/stats").json()["models"]["tiny-random"]
    cfg = engine["config"]
    assert (cfg["max_batch"], cfg["max_step_tokens"], cfg["pipeline"], cfg["int8_decode"]) == (8, 2048, False, False)
    assert 2.9 < cfg["kv_memory_mb"] <= 3 and 0.9 < cfg["prefix_cache_mb"] <= 1
    assert engine["kv_blocks"] * (3 / cfg["kv_memory_mb"]) == pytest.approx(3 * 2**20 / _block_bytes(), rel=0.02)
    assert engine["images"]["max_crops"] == 1


def _block_bytes() -> int:
    from moonbase.hub import tiny_random

    t = tiny_random().cfg.text
    return 2 * t.n_layers * t.n_kv_heads * t.hd * 4 * 16  # fp32, 16 positions per block


def test_models_say_which_skills_they_run(served):
    _, base = served
    (model,) = httpx.get(base + "/v1/models").json()["data"]
    assert model["skills"] == ["caption", "query", "detect", "point"]  # a Moondream 2 has no segmentation head
