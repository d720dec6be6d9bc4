"""Live servers for tests that talk HTTP: an in-process app in a background thread, or real
`moonbase serve` processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from moonbase.server.run import free_port, serving  # noqa: F401  (serving: the in-process server, for tests)


@contextmanager
def serve_processes(flags: list[list[str]], logs: Path, first_port: int, model: str = "tiny-random") -> Iterator[list[str]]:
    """One `python -m moonbase serve --model MODEL` process per entry of `flags` (its extra flags); yields their
    base URLs once every one answers, and stops them all on exit."""
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
            deadline = time.time() + 60
            while not _up(url):
                assert proc.poll() is None and time.time() < deadline, (logs / f"{i}.log").read_text()
                time.sleep(0.1)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False
