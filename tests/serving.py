"""Live servers for tests that talk HTTP: an in-process app in a background thread, or real
`moonbase serve` processes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from moonbase.server.run import free_port, serving  # noqa: F401  (serving: the in-process server, for tests)


@contextmanager
def serve_processes(
    flags: list[list[str]], logs: Path, first_port: int, model: str = "tiny-random", start_s: float = 60
) -> Iterator[list[str]]:
    """One `python -m moonbase serve --model MODEL` process per entry of `flags` (its extra flags); yields their
    base URLs once every one answers (within `start_s`), and stops them all on exit."""
    repo = str(Path(__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    procs, urls, port = [], [], first_port
    for i, extra in enumerate(flags):
        port = free_port("127.0.0.1", port + 1)
        cmd = [sys.executable, "-m", "moonbase", "serve", "--model", model, "--device", "cpu", "--port", str(port)]
        with open(logs / f"{i}.log", "w") as log:
            procs.append(subprocess.Popen(cmd + extra, env=env, stdout=log, stderr=subprocess.STDOUT))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for i, (proc, url) in enumerate(zip(procs, urls, strict=True)):
            deadline = time.time() + start_s
            while not _up(url):
                assert proc.poll() is None and time.time() < deadline, (logs / f"{i}.log").read_text()
                time.sleep(0.1)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)  # a Ray Serve driver takes its cluster down first
            except subprocess.TimeoutExpired:
                proc.kill()


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def jpeg_roundtrip(image: Image.Image) -> np.ndarray:
    """What the server decodes: the official client sends JPEG quality 95."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=95)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
