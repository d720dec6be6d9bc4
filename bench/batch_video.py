"""Batch and video throughput, side by side in one run (prints JSON).

python bench/batch_video.py --model nano --images 256 [--ray] > result.json

* batch: `moonbase batch` (the engine at full concurrency, the tasks of one image sharing its prefix) vs a plain
  sequential loop over the Python API, on the same images and tasks (`--caption short --detect circle`); with
  `--ray`, the same job as a Ray Data pipeline on a local Ray instance (one engine actor per 2 CPUs).
* video: frames processed per second by `moonbase video`, at 1 and at 4 tasks per frame.
Images/s and frames/s are absolute on this machine: compare ratios, or runs on the same machine."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import moonbase
from moonbase.bench import machine
from moonbase.data.shapes import render_scene
from moonbase.jobs import parse_tasks, read_inputs, run_batch, task_label

TASKS = dict(caption=["short"], detect=["circle"])
VIDEO_TASKS = dict(detect=["circle"], point=["square"], query=["How many shapes are there?"], caption=["short"])


def sequential(vl, folder: Path, tasks) -> float:
    t0 = time.perf_counter()
    for item in read_inputs(folder):
        for t in tasks:
            vl.run(dataclasses.replace(t, image=str(item.source)))
    return time.perf_counter() - t0


def engine_job(vl, folder: Path, tasks) -> float:
    t0 = time.perf_counter()
    rows = list(run_batch(vl, read_inputs(folder), tasks, progress=False))
    assert all("result" in r for r in rows)
    return time.perf_counter() - t0


def ray_job(model: str, folder: Path, tasks) -> float:
    import ray

    from moonbase.jobs.distributed import run_batch_ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        actors = max(1, (os.cpu_count() or 2) // 2)
        rows = list(run_batch_ray(read_inputs(folder), tasks, model, actors=actors, progress=False))
        assert all("result" in r for r in rows)
        return time.perf_counter() - t0
    finally:
        ray.shutdown()


def render_video(path: Path, seconds: int = 8, fps: int = 12) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 256, 256, "yuv420p"
        for i in range(seconds * fps):
            image = render_scene(i // fps, size=(256, 256)).image  # a new scene every second
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def video_fps(vl, path: Path, n_tasks: int) -> float:
    from moonbase.jobs.video import Sampling, run_video

    specs = dict(list(VIDEO_TASKS.items())[:n_tasks])
    tasks = parse_tasks(**specs)
    t0 = time.perf_counter()
    rows = list(run_video(vl, str(path), tasks, Sampling(fps=4), progress=False))
    frames = len({r["frame"] for r in rows})
    return frames / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nano")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--ray", action="store_true")
    a = p.parse_args()
    vl = moonbase.vl(a.model)
    tasks = parse_tasks(**TASKS)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(a.images):
            render_scene(10_000 + i).image.save(folder / f"{i:05d}.png")
        engine_job(vl, folder, tasks[:1])  # warm-up (model, threads), not timed
        seq = sequential(vl, folder, tasks)
        job = engine_job(moonbase.vl(a.model), folder, tasks)  # a fresh engine: no image cached from the loop
        result = {
            "machine": machine(vl.model.device),
            "model": a.model,
            "batch": {
                "images": a.images,
                "tasks": [task_label(t) for t in tasks],
                "sequential_images_per_s": round(a.images / seq, 2),
                "batch_images_per_s": round(a.images / job, 2),
                "speedup": round(seq / job, 2),
            },
        }
        if a.ray:
            ray_s = ray_job(a.model, folder, tasks)
            result["batch"] |= {
                "ray_images_per_s": round(a.images / ray_s, 2),
                "ray_speedup_vs_sequential": round(seq / ray_s, 2),
            }
        video = Path(tmp) / "clip.mp4"
        render_video(video)
        result["video"] = {
            "sampling": "4 frames/s of an 8 s 256x256 clip (32 frames)",
            "frames_per_s_1_task": round(video_fps(moonbase.vl(a.model), video, 1), 2),
            "frames_per_s_4_tasks": round(video_fps(moonbase.vl(a.model), video, 4), 2),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
