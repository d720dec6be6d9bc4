"""Video: sample frames (PyAV), run every task on each through the engine, write a timeline, draw the results.

Frames are decoded on one thread while up to `concurrency` sampled frames run at once; one frame's tasks run
one after the other, so they share its image prefix. A file is read as fast as the model goes; a live source
(a stream URL or a webcam index) is read as fast as it comes, through a bounded queue that drops frames
rather than falling behind, and the number dropped is reported."""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..errors import SettingsError
from ..skills import SkillRequest
from .run import Row, check_tasks, run_item

LIVE_PREFIXES = ("rtsp://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")


@dataclass(frozen=True)
class Sampling:
    """Which frames to run: one every `every` seconds, `fps` a second, or every keyframe (the first of each
    group of pictures: cheap to decode, since the others are skipped)."""

    every: float | None = None
    fps: float | None = None
    keyframes: bool = False

    def __post_init__(self) -> None:
        if sum(x is not None and x is not False for x in (self.every, self.fps, self.keyframes or None)) != 1:
            raise SettingsError("choose one of --every, --fps and --keyframes")
        if (self.every is not None and not self.every > 0) or (self.fps is not None and not self.fps > 0):
            raise SettingsError("--every and --fps must be positive")

    @property
    def interval(self) -> float:
        return 0.0 if self.keyframes else (self.every if self.every is not None else 1.0 / self.fps)


@dataclass
class Frame:
    t: float  # seconds from the start of the stream
    index: int  # the frame's number in decoding order
    image: np.ndarray


@dataclass
class Stats:
    sampled: int = 0
    dropped: int = 0  # live sources: frames sampled while the queue was full
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)  # per task: first and last t with an object


def open_source(source: str | int) -> Any:
    """PyAV container: a file, a stream URL, or a webcam index (Linux v4l2 /dev/videoN)."""
    import av

    try:
        if isinstance(source, int) or str(source).isdigit():
            return av.open(f"/dev/video{int(source)}", format="v4l2")
        return av.open(str(source))
    except (av.FFmpegError, OSError) as e:
        raise SettingsError(f"cannot open video {source}: {e}") from e


def is_live(source: str | int) -> bool:
    return isinstance(source, int) or str(source).isdigit() or str(source).lower().startswith(LIVE_PREFIXES)


def sample_frames(source: str | int, sampling: Sampling) -> Iterator[Frame]:
    """The sampled frames, decoded to RGB, in order."""
    container = open_source(source)
    try:
        stream = container.streams.video[0]
        if sampling.keyframes:
            stream.codec_context.skip_frame = "NONKEY"
        next_t = 0.0
        for index, frame in enumerate(container.decode(stream)):
            t = float(frame.time if frame.time is not None else index / float(stream.average_rate or 25))
            if sampling.keyframes or t + 1e-6 >= next_t:
                next_t = (math.floor(t / sampling.interval + 1e-6) + 1) * sampling.interval if sampling.interval else t
                yield Frame(t, index, frame.to_ndarray(format="rgb24"))
    finally:
        container.close()


def _live(frames: Iterator[Frame], stats: Stats, capacity: int) -> Iterator[Frame]:
    """Frames from a reader thread through a queue of `capacity`; a frame that finds it full is dropped."""
    q: queue.Queue = queue.Queue(capacity)
    end = object()
    stop = threading.Event()

    def read() -> None:
        try:
            for f in frames:
                if stop.is_set():
                    return
                try:
                    q.put_nowait(f)
                except queue.Full:
                    stats.dropped += 1
        finally:
            q.put(end)

    threading.Thread(target=read, daemon=True, name="moonbase-video-reader").start()
    try:
        while (f := q.get()) is not end:
            yield f
    finally:
        stop.set()


def run_video(
    vl,
    source: str | int,
    tasks: tuple[SkillRequest, ...],
    sampling: Sampling,
    settings: dict[str, Any] | None = None,
    concurrency: int = 8,
    progress: bool = True,
    stats: Stats | None = None,
) -> Iterator[Row]:
    """Timeline rows in time order: `{"t", "frame", "task", "result"}` (or `"error"`) per sampled frame and task."""
    if not tasks:
        raise SettingsError("no task: give --caption, --query, --detect, --point or --segment")
    check_tasks(vl, tasks)
    stats = stats if stats is not None else Stats()
    frames = sample_frames(source, sampling)
    if is_live(source):
        frames = _live(frames, stats, capacity=2 * concurrency)
    bar = tqdm(desc="video", unit="frame", disable=not progress)
    pending: deque = deque()  # (frame, future) in time order: rows come out in order as the oldest finish
    with ThreadPoolExecutor(concurrency) as pool:
        try:
            for f in frames:
                pending.append((f, pool.submit(run_item, vl, f"{f.t:.3f}", f.image, list(tasks), settings or {})))
                while len(pending) >= concurrency or (pending and pending[0][1].done()):
                    yield from _emit(*pending.popleft(), stats, bar)
            while pending:
                yield from _emit(*pending.popleft(), stats, bar)
        finally:
            bar.close()


def _emit(f: Frame, future, stats: Stats, bar: tqdm) -> Iterator[Row]:
    stats.sampled += 1
    bar.update(1)
    for row in future.result():
        out = {"t": round(f.t, 3), "frame": f.index, "task": row["task"]}
        out |= {"result": row["result"]} if "result" in row else {"error": row["error"]}
        found = out.get("result", {})
        if found.get("objects") or found.get("points") or found.get("path"):
            seen = stats.seen.setdefault(out["task"], {"first_t": out["t"], "frames": 0})
            seen["last_t"], seen["frames"] = out["t"], seen["frames"] + 1
        yield out


def draw_video(source: str, timeline: list[Row], out: str | Path) -> int:
    """Every frame of `source`, drawn with the results of the latest sampled frame at or before it, encoded
    as H.264 at the source's rate; returns the number of frames written."""
    import av

    from ..draw import annotate

    at: dict[float, list[Row]] = {}
    for row in timeline:
        at.setdefault(row["t"], []).append(row)
    times = sorted(at)
    src = open_source(source)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    dst = av.open(str(out), "w")
    try:
        stream_in = src.streams.video[0]
        rate = stream_in.average_rate or 25
        stream = dst.add_stream("libx264", rate=rate)
        stream.width, stream.height = stream_in.width // 2 * 2, stream_in.height // 2 * 2
        stream.pix_fmt = "yuv420p"
        k, n = -1, 0
        for frame in src.decode(stream_in):
            t = float(frame.time or 0.0)
            while k + 1 < len(times) and times[k + 1] <= t + 1e-6:
                k += 1
            rows = at[times[k]] if k >= 0 else []
            results = [r["result"] for r in rows if "result" in r]
            image = annotate(
                frame.to_ndarray(format="rgb24")[: stream.height, : stream.width],
                [o for r in results for o in r.get("objects", [])],
                [p for r in results for p in r.get("points", [])],
                paths=[r["path"] for r in results if r.get("path")],
            )
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(image), format="rgb24")):
                dst.mux(packet)
            n += 1
        for packet in stream.encode():
            dst.mux(packet)
    finally:
        dst.close()
        src.close()
    return n
