"""`moonbase serve --ray`: the HTTP API as a Ray Serve application with two replicas answers the official client
exactly as the in-process API does (greedy), streaming included."""

from __future__ import annotations

import httpx
import pytest

from moonbase import vl
from moonbase.data.shapes import render_scene

from .serving import jpeg_roundtrip, serve_processes

pytest.importorskip("ray.serve", reason="Ray is an optional extra (moonbase[ray]); the test extras install it")


def test_two_ray_serve_replicas_answer_like_the_in_process_api(tmp_path):
    import moondream as md

    with serve_processes([["--ray", "--replicas", "2"]], tmp_path, 25120, model="nano", start_s=240) as (url,):
        client, local = md.vl(endpoint=url + "/v1"), vl("nano")
        greedy = {"temperature": 0.0}
        for seed in range(4):  # several requests: the proxy spreads them over both replicas
            image = render_scene(seed).image.convert("RGB")
            want = local.caption(jpeg_roundtrip(image), "short", settings=greedy)["caption"]
            assert client.caption(image, "short", settings=greedy)["caption"] == want
            assert client.detect(image, "circle") == {"objects": local.detect(jpeg_roundtrip(image), "circle")["objects"]}
        assert "".join(client.caption(image, "short", stream=True, settings=greedy)["caption"]) == want
        r = httpx.post(url + "/v1/detect", json={"image_url": "data:image/png;base64,AAAA", "object": "x"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"]  # the same error table
