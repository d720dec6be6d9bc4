"""The batch job as a Ray Data pipeline, for when one machine is not enough.

read (the driver lists the items left to do) → decode on CPU workers (`map`) → an actor pool of engines, one
per GPU or `actors` on CPUs, each holding one model and running a batch of images at full concurrency
(`map_batches`) → rows streamed back to the driver, which writes them to the same journal as the
single-process job: same output format, same resumability. Point it at a cluster with `--ray ADDRESS`
(`ray://head:10001`, or `auto` inside one); with no address a local Ray instance is started."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm import tqdm

from ..device import ray_copies
from ..errors import SettingsError
from ..skills import SkillRequest
from .inputs import Item
from .journal import Journal
from .run import Row, request_fields, run_item, task_label


def _request_dict(req: SkillRequest) -> dict[str, Any]:
    return {"skill": req.skill.name, "settings": req.settings_dict, **request_fields(req)}


def _request(d: dict[str, Any]) -> SkillRequest:
    return SkillRequest(d["skill"], None, **{k: v for k, v in d.items() if k != "skill"})


def _decode(record: dict[str, Any]) -> dict[str, Any]:
    """CPU workers: the image decoded to RGB pixels, or the error that stops it (reported per task)."""
    from ..image import load_image

    source, max_pixels = record.pop("source"), record.pop("max_pixels")
    try:
        if record["error"]:
            raise SettingsError(record["error"])
        record["pixels"] = load_image(source, max_pixels)
    except (OSError, ValueError) as e:
        record["error"] = json.dumps({"type": type(e).__name__, "message": str(e)})
        record["pixels"] = np.zeros((1, 1, 3), np.uint8)
    return record


def _overlapping_calls(ray) -> dict[str, Any]:
    """Two batches in an actor at once, so the next joins the engine while the last drains (a Ray without the
    option runs one batch at a time)."""
    import inspect

    params = inspect.signature(ray.data.ActorPoolStrategy).parameters
    if "max_concurrent_calls_per_actor" not in params:
        return {}
    return {"max_concurrent_calls_per_actor": 2, "enable_true_multi_threading": True}


class EngineActor:
    """One model and its engine; a batch of images runs at once, so the engine batches their requests."""

    def __init__(self, model: str | None, engine: dict[str, Any], settings: dict[str, Any], concurrency: int):
        import moonbase

        self.vl = moonbase.vl(model, **engine)
        self.settings, self.concurrency = settings, concurrency

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        def one(i: int) -> list[Row]:
            reqs = [_request(d) for d in json.loads(batch["tasks"][i])]
            if batch["error"][i]:
                e = json.loads(batch["error"][i])
                return [{"image": batch["key"][i], "task": task_label(r), "error": e} for r in reqs]
            return run_item(self.vl, batch["key"][i], batch["pixels"][i], reqs, self.settings)

        with ThreadPoolExecutor(self.concurrency) as pool:
            rows = [row for rows in pool.map(one, range(len(batch["key"]))) for row in rows]
        return {"row": [json.dumps(r, ensure_ascii=False) for r in rows]}


def run_batch_ray(
    items: Iterable[Item],
    tasks: tuple[SkillRequest, ...],
    model: str | None = None,
    engine: dict[str, Any] | None = None,
    journal: Journal | None = None,
    settings: dict[str, Any] | None = None,
    address: str | None = None,
    actors: int | None = None,
    batch_size: int = 16,
    max_pixels: int | None = None,
    progress: bool = True,
    total: int | None = None,
) -> Iterator[Row]:
    """Rows as the pipeline returns them; `actors` engines (default: one per GPU, else one)."""
    try:
        import ray
    except ImportError as e:
        raise SettingsError("--ray needs Ray Data: pip install 'moonbase[ray]'") from e
    from ..image import DEFAULT_MAX_PIXELS

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows one bar, of images
    done = journal.done if journal is not None else set()
    records = []
    for item in items:
        reqs = [r for r in (item.requests or tasks) if (item.key, task_label(r)) not in done]
        if reqs:
            error = str(item.source) if isinstance(item.source, Exception) else ""
            source = None if error else (str(item.source) if not isinstance(item.source, bytes) else item.source)
            records.append({"key": item.key, "source": source, "error": error, "max_pixels": max_pixels or DEFAULT_MAX_PIXELS})
            records[-1]["tasks"] = json.dumps([_request_dict(r) for r in reqs])
    if not records:
        return
    actors, resources = ray_copies(ray, actors)
    # On GPUs, decoding runs as CPU tasks beside the engines; on CPUs, inside the engine actors: given the same
    # resources, Ray fuses the two steps (with fewer, decode tasks would wait for cores the actors hold).
    ds = ray.data.from_items(records).map(_decode, num_cpus=resources["num_cpus"] or 1)
    ds = ds.map_batches(
        EngineActor,
        fn_constructor_args=(model, engine or {}, settings or {}, batch_size),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors, **_overlapping_calls(ray)),
        **resources,
    )
    bar = tqdm(total=total, initial=(total or 0) - len(records), desc="batch (ray)", unit="image", disable=not progress)
    seen: set[str] = set()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for text in batch["row"]:
                row = json.loads(text)
                if journal is not None:
                    journal.write(row)
                if row["image"] not in seen:
                    seen.add(row["image"])
                    bar.update(1)
                yield row
    finally:
        bar.close()
