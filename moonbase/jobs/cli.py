"""`moonbase batch INPUT --caption short --detect person -o out.jsonl`: the command line of batch jobs."""

from __future__ import annotations

import argparse
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
    tasks = p.add_argument_group("tasks", "applied to every image, in this order (repeat a flag for several)")
    tasks.add_argument("--caption", action="append", default=[], nargs="?", const="normal", metavar="LENGTH")
    tasks.add_argument("--query", action="append", default=[], metavar="QUESTION")
    tasks.add_argument("--detect", action="append", default=[], metavar="OBJECT")
    tasks.add_argument("--point", action="append", default=[], metavar="OBJECT")
    tasks.add_argument("--segment", action="append", default=[], metavar="OBJECT")
    p.add_argument("--image-column", help="Parquet: the column of image paths or bytes (default: image, image_path, ...)")
    p.add_argument("--concurrency", type=int, default=32, help="images in flight at once (default 32)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--max-objects", type=int)
    model_args(p)
    p.set_defaults(fn=cmd_batch)


def cmd_batch(a: argparse.Namespace) -> int:
    from ..cli import vl_from_args
    from ..errors import SettingsError
    from .batch import parse_tasks, run_batch
    from .inputs import count_inputs, read_inputs
    from .journal import Journal

    tasks = parse_tasks(a.caption, a.query, a.detect, a.point, a.segment)
    total = count_inputs(a.input, a.image_column)
    if not tasks and not a.input.lower().endswith(".jsonl"):
        raise SettingsError("no task: give --caption, --query, --detect, --point or --segment")
    if total == 0:
        raise SettingsError(f"no images in {a.input}")
    settings = {k: v for k in ("temperature", "max_tokens", "max_objects") if (v := getattr(a, k)) is not None}
    vl = vl_from_args(a)
    journal = Journal(a.output) if a.output else None
    skipped = len(journal.done) if journal else 0
    counts, t0 = {"rows": 0, "errors": 0}, time.perf_counter()
    try:
        for row in run_batch(vl, read_inputs(a.input, a.image_column), tasks, journal, settings, a.concurrency, total=total):
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
