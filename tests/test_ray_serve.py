"""`moonbase serve --ray`: the HTTP API as a Ray Serve application with two replicas answers the official client
exactly as the in-process API does (greedy), streaming included."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from moonbase import vl
from moonbase.data.shapes import render_scene
from moonbase.server.run import free_port

pytest.importorskip("ray.serve", reason="Ray is an optional extra (moonbase[ray]); the test extras install it")
REPO = Path(__file__).resolve().parents[1]


def test_two_ray_serve_replicas_answer_like_the_in_process_api(tmp_path):
    import moondream as md

    port = free_port("127.0.0.1", 25120)
    cmd = [sys.executable, "-m", "moonbase", "serve", "--ray", "--replicas", "2", "--model", "nano", "--port", str(port)]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=os.environ | {"PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/health", timeout=5).json().get("status") == "ok":
                    break
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.5)
        client, local = md.vl(endpoint=url + "/v1"), vl("nano")
        greedy = {"temperature": 0.0}
        for seed in range(4):  # several requests: the proxy spreads them over both replicas
            image = render_scene(seed).image.convert("RGB")
            want = local.caption(_jpeg(image), "short", settings=greedy)["caption"]
            assert client.caption(image, "short", settings=greedy)["caption"] == want
            assert client.detect(image, "circle") == {"objects": local.detect(_jpeg(image), "circle")["objects"]}
        assert "".join(client.caption(image, "short", stream=True, settings=greedy)["caption"]) == want
        r = httpx.post(url + "/v1/detect", json={"image_url": "data:image/png;base64,AAAA", "object": "x"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"]  # the same error table
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _jpeg(image):
    """What the server decodes: the client sends JPEG quality 95."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
