"""Batch jobs: every task on every image, through one engine at full concurrency.

Many images are in flight at once (the engine batches their requests); one image's tasks run one after the
other, so the first pays for the vision encoder and the image prefill and the rest hit the prefix cache."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from tqdm import tqdm

from ..errors import SettingsError
from ..image import load_image
from ..skills import SkillRequest
from .inputs import Item, read_inputs
from .journal import Journal, Row


def task_label(req: SkillRequest) -> str:
    """What output rows call the task: `skill:argument` (`caption:short`, `detect:circle`, `query:How many?`)."""
    return f"{req.skill.name}:{getattr(req, req.skill.arg) or ''}"


def parse_tasks(caption: Iterable[str] = (), query: Iterable[str] = (), detect: Iterable[str] = (), point=(), segment=()):
    """The command line's task flags as request templates (no image yet), in that order."""
    specs = [("caption", a) for a in caption] + [("query", a) for a in query] + [("detect", a) for a in detect]
    specs += [("point", a) for a in point] + [("segment", a) for a in segment]
    return tuple(SkillRequest.of(skill, None, arg) for skill, arg in specs)


def check_tasks(vl, tasks: tuple[SkillRequest, ...]) -> None:
    """Fail before any image is read: a skill the model lacks, or a bad argument (an empty object...)."""
    m = vl.model
    for t in tasks:
        t.skill.require(m.cfg, f"model {m.name!r}")
        t.skill.prompt(t.with_defaults(m.cfg.defaults), m.tokenizer)


def run_batch(
    vl,
    items: Iterable[Item],
    tasks: tuple[SkillRequest, ...],
    journal: Journal | None = None,
    settings: dict[str, Any] | None = None,
    concurrency: int = 32,
    progress: bool = True,
    total: int | None = None,
) -> Iterator[Row]:
    """Rows as images finish (completion order). With a journal, rows are written to it and (image, task)
    pairs it holds are skipped. `settings` apply to every task without its own (JSONL rows bring theirs)."""
    check_tasks(vl, tasks)
    done = journal.done if journal is not None else set()
    bar = tqdm(total=total, desc="batch", unit="image", disable=not progress, smoothing=0.05)
    in_flight: set[Future] = set()
    with ThreadPoolExecutor(concurrency) as pool:
        try:
            for item in items:
                reqs = item.requests or tasks
                if not reqs:  # a JSONL row with neither a skill nor job tasks
                    error = item.source if isinstance(item.source, Exception) else SettingsError("no task for this image")
                    rows = [] if (item.key, "") in done else [_error(item.key, "", error)]
                    yield from _collect_rows(rows, journal, bar)
                    continue
                todo = [r for r in reqs if (item.key, task_label(r)) not in done]
                if not todo:
                    bar.update(1)
                    continue
                if len(in_flight) >= concurrency:
                    finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    yield from _collect(finished, journal, bar)
                in_flight.add(pool.submit(run_item, vl, item.key, item.source, todo, settings or {}))
            while in_flight:
                finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                yield from _collect(finished, journal, bar)
        finally:
            for f in in_flight:
                f.cancel()
            bar.close()


def _collect(finished: set[Future], journal: Journal | None, bar: tqdm) -> Iterator[Row]:
    for f in finished:
        yield from _collect_rows(f.result(), journal, bar)


def _collect_rows(rows: list[Row], journal: Journal | None, bar: tqdm) -> Iterator[Row]:
    for row in rows:
        if journal is not None:
            journal.write(row)
        yield row
    bar.update(1)


def run_item(vl, key: str, source: Any, reqs: list[SkillRequest], settings: dict[str, Any]) -> list[Row]:
    """One image's rows: its tasks one after the other (the first prefills the image, the rest reuse it)."""
    labels = [task_label(r) for r in reqs]
    if isinstance(source, Exception):
        return [_error(key, label, source) for label in labels]
    try:
        image = load_image(source, vl.limits.max_pixels)
    except (OSError, ValueError) as e:  # ImageError is a ValueError
        return [_error(key, label, e) for label in labels]
    rows = []
    for req, label in zip(reqs, labels, strict=True):
        req = SkillRequest(req.skill, image, **request_fields(req), settings=settings | req.settings_dict)
        try:
            rows.append({"image": key, "task": label, "result": vl.run(req)})
        except Exception as e:  # one failed task is one error row; the job goes on
            rows.append(_error(key, label, e))
    return rows


def request_fields(req: SkillRequest) -> dict[str, Any]:
    """A request's arguments besides its skill, image and settings (those given)."""
    keys = ("question", "object", "length", "reasoning", "spatial_refs")
    return {k: getattr(req, k) for k in keys if getattr(req, k) is not None}


def _error(key: str, label: str, e: BaseException) -> Row:
    return {"image": key, "task": label, "error": {"type": type(e).__name__, "message": str(e)}}


def batch(
    inputs: str | Iterable[Item],
    tasks: Iterable[SkillRequest] = (),
    *,
    model: Any = None,
    output: str | None = None,
    settings: dict[str, Any] | None = None,
    concurrency: int = 32,
    progress: bool = False,
) -> Iterator[Row]:
    """Run `tasks` (request templates: `SkillRequest("detect", None, object="person")`, or `parse_tasks(...)`)
    on every image of `inputs` (a folder, glob, .txt, .jsonl or .parquet path, or `Item`s) and yield the rows as
    they finish. `model`: a `VL`, or a name for `moonbase.vl`. With `output` (.jsonl or .parquet) rows are also
    written there, and a rerun skips what it holds."""
    from .. import vl as load_vl
    from ..api import VL

    vl = model if isinstance(model, VL) else load_vl(model)
    items = read_inputs(inputs) if isinstance(inputs, str) else inputs
    tasks = tuple(tasks)
    journal = Journal(output) if output is not None else None
    try:
        yield from run_batch(vl, items, tasks, journal, settings, concurrency, progress)
    finally:
        if journal is not None:
            journal.close()
