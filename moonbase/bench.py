"""Engine benchmark: throughput and latency at several concurrencies against the single-request path,
on the same model and workload in one run, and the time-to-first-token gain of the image-prefix cache.

python -m moonbase.bench --model nano --json [--soak 10000]

Workload: `--requests` requests, each about its own new image (so no cache can help), cycling through
caption, query, detect and point with greedy settings. Closed loop: `c` client threads each send their
next request when the previous one is answered. `--soak N` then sends N more (new images, 16 clients) and
reports resident memory after warm-up and at the end, and anything the idle engine still holds."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from . import simple
from .api import VL
from .atomic import write_text_atomic
from .data.shapes import render_scene
from .device import release_cpu_threads
from .engine.engine import Engine, EngineConfig
from .engine.sequence import Sequence
from .hub import DEFAULT_MODEL, load
from .image import overlap_crops
from .skills import SkillRequest

SETTINGS = {"temperature": 0.0, "max_tokens": 32, "max_objects": 8}
WORKLOAD = (  # request i asks WORKLOAD[i % 4] about its image
    SkillRequest("caption", length="normal", settings=SETTINGS),
    SkillRequest("query", question="How many circles are there?", settings=SETTINGS),
    SkillRequest("detect", object="circle", settings=SETTINGS),
    SkillRequest("point", object="red shape", settings=SETTINGS),
)


def scene_images(n: int, seed: int) -> list[np.ndarray]:
    """`n` synthetic shape scenes (seeded, disjoint across `seed`s): the images the benchmarks send."""
    return [np.asarray(render_scene(seed * 100_000 + i).image) for i in range(n)]


def _run_one(vl: VL, image: Any, i: int) -> Any:
    """Request `i` of the workload through the engine."""
    return vl.run(dataclasses.replace(WORKLOAD[i % len(WORKLOAD)], image=image))


def sequential(vl: VL, images: list[np.ndarray]) -> dict[str, float]:
    """The single-request path, one request after another: vision, prefill and decode per request."""
    latencies = []
    t0 = time.perf_counter()
    for i, image in enumerate(images):
        start = time.perf_counter()
        _single(vl.model, image, i)
        latencies.append(time.perf_counter() - start)
    return _summary(len(images), time.perf_counter() - t0, latencies)


@torch.no_grad()
def _single(m, image: np.ndarray, i: int) -> None:
    """Request `i` of the workload on the single-request path."""
    simple.run(m, _encode(m, image), WORKLOAD[i % len(WORKLOAD)])


def _encode(m, image: np.ndarray):
    """Vision encoder and image prefill of one image on the single-request path."""
    return m.prefill_image(m.embed_crops([overlap_crops(image, m.cfg.vision)])[0])


def work(vl: VL, images: list[np.ndarray], sequential_rps: float) -> dict[str, float]:
    """The workload's arithmetic (the linear layers' products as torch's counter sees them; attention at
    these lengths is a few percent more) and the rates it bounds if every product ran as fast as one large
    matmul on this machine: requests/s (so the most `speedup` any batching could give over the measured
    single-request path), and the follow-up time-to-first-token gain if that time were proportional to work."""
    m = vl.model
    first_token = SkillRequest("query", question="What color is the star?", settings=SETTINGS | {"max_tokens": 1})

    def flops(fn: Callable[[], Any]) -> tuple[float, Any]:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = fn()
        return float(counter.get_total_flops()), out

    request = statistics.mean(flops(lambda i=i, image=image: _single(m, image, i))[0] for i, image in enumerate(images))
    image, enc = flops(lambda: _encode(m, images[0]))
    followup, _ = flops(lambda: simple.run(m, enc, first_token))  # the prompt's prefill and one token
    gflops = _matmul_gflops(m)
    return {
        "request_mflop": request / 1e6,
        "image_mflop": image / 1e6,
        "followup_first_token_mflop": followup / 1e6,
        "matmul_gflops": gflops,
        "rps_bound": gflops * 1e9 / request,
        "speedup_bound": gflops * 1e9 / request / sequential_rps,
        "followup_speedup_bound": (image + followup) / followup,
    }


def _matmul_gflops(m, rows: int = 512, reps: int = 50) -> float:
    """This machine's speed on one large product of the text decoder's MLP shape (prefill-sized)."""
    a = torch.randn(rows, m.cfg.text.dim, device=m.device, dtype=m.dtype)
    b = torch.randn(m.cfg.text.dim, m.cfg.text.ff_dim, device=m.device, dtype=m.dtype)
    for _ in range(5):
        a @ b
    _sync(m.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(m.device)
    return 2 * rows * m.cfg.text.dim * m.cfg.text.ff_dim * reps / (time.perf_counter() - t0) / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def concurrent(vl: VL, images: list[np.ndarray], clients: int) -> dict[str, float]:
    return closed_loop(len(images), clients, lambda i: _run_one(vl, images[i], i))


def closed_loop(jobs: int, clients: int, job: Callable[[int], None], requests_per_job: int = 1) -> dict[str, float]:
    """`clients` threads run jobs 0..jobs-1, each thread its next job when its previous one is done.
    Latencies are per job; the rate is in requests per second."""
    latencies: list[float] = []
    lock, queue = threading.Lock(), iter(range(jobs))

    def client() -> None:
        while True:
            with lock:
                i = next(queue, None)
            if i is None:
                return
            start = time.perf_counter()
            job(i)
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _summary(jobs * requests_per_job, time.perf_counter() - t0, latencies)


def followup(vl: VL, images: list[np.ndarray]) -> dict[str, float]:
    """Time to first token of a first question about a new image, and of a second question about it."""
    first, second = [], []
    for image in images:
        for bucket, question in ((first, "How many circles are there?"), (second, "What color is the star?")):
            req = SkillRequest("query", image, question, settings=SETTINGS)
            bucket.append(vl.wait([vl.submit(vl.prepare(req))])[0].stats["ttft_ms"])
    return {"first_ttft_ms": statistics.median(first), "followup_ttft_ms": statistics.median(second)}


def soak(vl: VL, n: int, seed: int, clients: int = 16) -> dict[str, Any]:
    """`n` requests, each about its own new image, from `clients` threads. Resident memory is sampled after
    warm-up (the first 10%) and at the end; when idle the engine must hold nothing but cached prefixes."""
    engine, lock, done = vl.engine, threading.Lock(), [0]
    rss: dict[str, float | None] = {}

    def request(i: int) -> None:
        _run_one(vl, np.asarray(render_scene(seed * 1_000_000 + i).image), i)
        with lock:
            done[0] += 1
            if done[0] == n // 10:
                rss["warm"] = _rss_mb()

    seconds = closed_loop(n, clients, request)["seconds"]
    gc.collect()
    stats = engine.stats
    return {
        "requests": n,
        "seconds": seconds,
        "rss_after_warmup_mb": rss.get("warm"),
        "rss_end_mb": _rss_mb(),
        "leaked_blocks": stats["kv_blocks"] - stats["kv_blocks_free"] - stats["kv_blocks_cached"],
        "sequences_alive": sum(type(o) is Sequence for o in gc.get_objects()),
        "in_flight": stats["in_flight"],
    }


def machine(device: torch.device) -> dict[str, Any]:
    """What a recorded result ran on."""
    return {
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def _cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)


def _rss_mb() -> float | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        return None


def _summary(n: int, seconds: float, latencies: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies)
    return {"rps": n / seconds, "p50_ms": ms[len(ms) // 2], "p99_ms": ms[round(0.99 * (len(ms) - 1))], "seconds": seconds}


def run(
    model: str | None,
    requests: int,
    concurrencies: tuple[int, ...],
    seed: int,
    device: str | None,
    int8: bool = False,
    soak_requests: int = 0,
) -> dict[str, Any]:
    m = load(model, device)
    engine = Engine(m, EngineConfig(max_batch=max(concurrencies), int8_decode=int8))
    vl = VL(m, engine=engine)
    warm = scene_images(len(WORKLOAD), seed + 1)  # first-call costs (allocator, threads) out of the measurements
    dtype = str(m.dtype).split(".")[-1]
    out: dict[str, Any] = {"model": m.name, "requests": requests, "device": str(m.device), "dtype": dtype, "int8_decode": int8}
    sequential(vl, warm)
    out["sequential"] = sequential(vl, scene_images(requests, seed))
    out["sequential_rps"] = out["sequential"]["rps"]
    release_cpu_threads()  # this thread's CPU threads would slow the engine thread's (see the function)
    concurrent(vl, warm, len(warm))
    for c in concurrencies:
        engine.cache.clear()
        out[f"engine_c{c}"] = concurrent(vl, scene_images(requests, seed + 10 + c), c)  # new images: no cache hits possible
        out[f"engine_rps_c{c}"] = out[f"engine_c{c}"]["rps"]
    top = max(concurrencies)
    out[f"speedup_c{top}"] = out[f"engine_rps_c{top}"] / out["sequential_rps"]
    engine.cache.clear()
    out |= followup(vl, scene_images(8, seed + 999))
    out["followup_speedup"] = out["first_ttft_ms"] / out["followup_ttft_ms"]
    out["work"] = work(vl, scene_images(len(WORKLOAD) * 4, seed + 5), out["sequential_rps"])
    if soak_requests:
        out["soak"] = soak(vl, soak_requests, seed + 7)
    return out | {"machine": machine(m.device), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moonbase.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--int8", action="store_true", help="engine decode steps through int8 linear layers (CPU)")
    p.add_argument("--soak", type=int, default=0, help="then this many more requests, checking memory stays flat")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also write the result to this file (e.g. bench/results/NAME.json)")
    a = p.parse_args(argv)
    result = run(a.model, a.requests, tuple(int(c) for c in a.concurrency.split(",")), a.seed, a.device, a.int8, a.soak)
    print(json.dumps(result, indent=None if a.json else 2))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(a.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
