"""A load test from another process: 128 concurrent clients against a server that admits 8 at a time.
No 5xx, overflow answered with 429 (not a hang), the server healthy and its memory bounded afterwards."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from moonbase.server.run import free_port


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _start_server(tmp_path: Path, first_port: int, *flags: str) -> tuple[subprocess.Popen, str]:
    """`moonbase serve` with the tiny model in another process, once it answers /health."""
    port = free_port("127.0.0.1", first_port)
    cmd = [sys.executable, "-m", "moonbase", "serve", "--model", "tiny-random", "--port", str(port), *flags]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"))
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return server, base
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"the server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")


def test_128_concurrent_clients(tmp_path):
    server, base = _start_server(tmp_path, 24020, "--max-in-flight", "8")
    try:
        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (90, 140, 200)).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

        def one(i: int) -> int:
            body = {"image_url": url, "length": "long", "settings": {"max_tokens": 48, "temperature": 0.5, "seed": i}}
            return httpx.post(base + "/v1/caption", json=body, timeout=120).status_code

        one(0)
        rss_before = _rss_mb(server.pid)
        statuses = []
        for _ in range(2):  # two waves: memory must not keep growing
            with ThreadPoolExecutor(128) as pool:
                statuses += list(pool.map(one, range(128)))
        rss_after = _rss_mb(server.pid)
        assert all(s in (200, 429) for s in statuses), sorted(set(statuses))
        assert statuses.count(200) >= 8 and statuses.count(429) >= 1
        assert httpx.get(base + "/health", timeout=5).json()["status"] == "ok"
        assert rss_after - rss_before < 300, (rss_before, rss_after)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_shutdown_drains_requests_in_flight(tmp_path):
    import signal

    server, base = _start_server(tmp_path, 26020)
    try:
        body = {"question": "Tell me everything.", "settings": {"max_tokens": 400, "temperature": 1.0, "top_p": 1.0}}

        def one(i: int) -> tuple[int, int]:
            r = httpx.post(base + "/v1/query", json={**body, "settings": {**body["settings"], "seed": i}}, timeout=120)
            return r.status_code, r.json()["_stats"]["output_tokens"] if r.status_code == 200 else 0

        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(one, i) for i in range(16)]
            time.sleep(0.5)  # requests are running in the engine
            server.send_signal(signal.SIGINT)
            results = [f.result() for f in futures]
        assert all(status == 200 for status, _ in results), results
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
