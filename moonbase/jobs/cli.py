"""`moonbase batch INPUT --caption short --detect person -o out.jsonl`: the command line of batch jobs."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable


def add_parser(sub, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "batch",
        help="run tasks on a folder, glob, list, JSONL or Parquet of images; resumable JSONL/Parquet output",
        description="Every task on every image, through one engine at full concurrency. Rerun the same command after "
        "an interruption (Ctrl-C, kill -9): it skips what the output holds and loses nothing.",
    )
    p.add_argument("input", help="a folder, a glob ('imgs/*.jpg'), a .txt of paths, a .jsonl of requests, a .parquet")
    p.add_argument("-o", "--output", help="output .jsonl or .parquet (default: JSONL rows on stdout, not resumable)")
    _task_args(p, "image")
    p.add_argument("--image-column", help="Parquet: the column of image paths or bytes (default: image, image_path, ...)")
    p.add_argument("--concurrency", type=int, default=32, help="images in flight at once (default 32; with --ray: per actor)")
    ray_flags(p, "run as a Ray Data pipeline", "--actors", "engines")
    model_args(p)
    p.set_defaults(fn=cmd_batch)

    p = sub.add_parser(
        "video",
        help="run tasks on sampled frames of a video file or live source; JSONL timeline, annotated video",
        description="Decode with PyAV, sample frames, run every task on each (a frame's tasks share its image prefix).",
    )
    p.add_argument("input", nargs="?", help="a video file (anything FFmpeg reads)")
    p.add_argument("--source", help="a live source instead: a stream URL (rtsp://...) or a webcam index (0)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--every", type=_seconds, metavar="SECONDS", help="one frame every SECONDS (0.5 or 0.5s; default 1s)")
    when.add_argument("--fps", type=float, help="this many frames a second")
    when.add_argument("--keyframes", action="store_true", help="every keyframe (fast: the other frames are not decoded)")
    p.add_argument("-o", "--output", help="the timeline as JSONL (default: stdout)")
    p.add_argument("--draw", metavar="OUT.mp4", help="write the video with each frame's latest results drawn (files only)")
    p.add_argument("--summary", metavar="PATH", help="write the per-task summary (first and last seen) as JSON")
    _task_args(p, "frame")
    p.add_argument("--concurrency", type=int, default=8, help="frames in flight at once (default 8)")
    model_args(p)
    p.set_defaults(fn=cmd_video)


def ray_flags(p: argparse.ArgumentParser, what: str, count: str, counted: str) -> None:
    """--ray [ADDRESS] and how many copies of the model it starts (batch's actors, serve's replicas)."""
    help = f"{what}: on a local Ray instance, or the cluster at ADDRESS (ray://head:10001, auto)"
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS", help=help)
    p.add_argument(count, type=int, help=f"with --ray: {counted} (default: one per GPU, else one)")


def _task_args(p: argparse.ArgumentParser, what: str) -> None:
    tasks = p.add_argument_group("tasks", f"applied to every {what}, in this order (repeat a flag for several)")
    tasks.add_argument("--caption", action="append", default=[], nargs="?", const="normal", metavar="LENGTH")
    tasks.add_argument("--query", action="append", default=[], metavar="QUESTION")
    tasks.add_argument("--detect", action="append", default=[], metavar="OBJECT")
    tasks.add_argument("--point", action="append", default=[], metavar="OBJECT")
    tasks.add_argument("--segment", action="append", default=[], metavar="OBJECT")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--max-objects", type=int)


def _seconds(text: str) -> float:
    try:
        value = float(text.removesuffix("s"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds like 0.5 or 0.5s, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _settings(a: argparse.Namespace) -> dict:
    return {k: v for k in ("temperature", "max_tokens", "max_objects") if (v := getattr(a, k)) is not None}


def cmd_batch(a: argparse.Namespace) -> int:
    from ..cli import vl_from_args
    from ..errors import SettingsError
    from .inputs import count_inputs, read_inputs
    from .journal import Journal
    from .run import parse_tasks, run_batch

    tasks = parse_tasks(a.caption, a.query, a.detect, a.point, a.segment)
    total = count_inputs(a.input, a.image_column)
    if not tasks and not a.input.lower().endswith(".jsonl"):
        raise SettingsError("no task: give --caption, --query, --detect, --point or --segment")
    if total == 0:
        raise SettingsError(f"no images in {a.input}")
    settings = _settings(a)
    journal = Journal(a.output) if a.output else None
    skipped = len(journal.done) if journal else 0
    counts, t0 = {"rows": 0, "errors": 0}, time.perf_counter()
    items = read_inputs(a.input, a.image_column)
    if a.ray:
        from ..cli import engine_args
        from .distributed import run_batch_ray

        address = None if a.ray == "local" else a.ray
        rows = run_batch_ray(
            items, tasks, a.model, engine_args(a), journal, settings, address, a.actors, a.concurrency, total=total
        )
    else:
        rows = run_batch(vl_from_args(a), items, tasks, journal, settings, a.concurrency, total=total)
    try:
        for row in rows:
            counts["rows"] += 1
            counts["errors"] += "error" in row
            if journal is None:
                print(json.dumps(row, ensure_ascii=False), flush=True)
    finally:
        if journal is not None:
            journal.close()
    seconds = time.perf_counter() - t0
    summary = counts | {"skipped_done": skipped, "images": total, "seconds": round(seconds, 1)}
    print(json.dumps(summary), file=sys.stderr)
    return 1 if counts["rows"] and counts["rows"] == counts["errors"] else 0  # non-zero only if nothing could run


def cmd_video(a: argparse.Namespace) -> int:
    from ..atomic import atomic_path, write_text_atomic
    from ..cli import vl_from_args
    from ..errors import SettingsError
    from .run import parse_tasks
    from .video import Sampling, Stats, draw_video, run_video

    if (a.input is None) == (a.source is None):
        raise SettingsError("give a video file or --source (not both)")
    if a.draw and a.source is not None:
        raise SettingsError("--draw needs a video file (a live source is not read twice)")
    source = a.input if a.source is None else a.source
    sampling = Sampling(every=a.every, fps=a.fps, keyframes=a.keyframes) if a.every or a.fps or a.keyframes else Sampling(1.0)
    tasks = parse_tasks(a.caption, a.query, a.detect, a.point, a.segment)
    stats, timeline = Stats(), []
    rows = run_video(vl_from_args(a), source, tasks, sampling, _settings(a), a.concurrency, stats=stats)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(stack.enter_context(atomic_path(a.output)), "w")) if a.output else sys.stdout
        for row in rows:
            timeline.append(row)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
    summary = {"frames": stats.sampled, "dropped": stats.dropped, "tasks": stats.seen}
    if a.draw:
        summary["drawn_frames"] = draw_video(source, timeline, a.draw)
    if a.summary:
        write_text_atomic(a.summary, json.dumps(summary, indent=2))
    print(json.dumps(summary), file=sys.stderr)
    return 0 if stats.sampled else 1
