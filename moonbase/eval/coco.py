"""`moonbase eval --suite coco`: detection on a COCO-format dataset on disk, scored by pycocotools.

Each image is asked `detect(<category name>)` once per category its annotations contain (as Moondream's own
COCO script does); the boxes become COCO results (`[x, y, width, height]` in pixels). Moondream gives no
confidence, so a score has to be chosen:

* `standard` (default): a box's score is 1 / (its place in the model's list), so what the model names first
  ranks first; mAP is pycocotools' mean over the categories evaluated.
* `moondream`: every score is 1.0 (ties keep the results' order) and the per-category APs are averaged
  weighted by each category's number of ground-truth boxes, as Moondream's COCO script reports it. With
  frequent categories found more easily, this gives a higher number than the standard mean."""

from __future__ import annotations

import contextlib
import io
import json
import time
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_text_atomic
from ..errors import SettingsError
from ..jobs import Item, run_batch
from ..jsonl import write_jsonl
from ..skills import SkillRequest


class CocoScoring(str, Enum):
    STANDARD = "standard"
    MOONDREAM = "moondream"


def evaluate_coco(
    vl,
    annotations: str | Path,
    images: str | Path,
    scoring: CocoScoring = CocoScoring.STANDARD,
    limit: int | None = None,
    predictions: str | Path | None = None,
    details: str | Path | None = None,
    concurrency: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise SettingsError("--suite coco needs pycocotools: pip install pycocotools") from e
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO(str(annotations))
    names = {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())}
    image_ids = sorted(gt.getImgIds())[:limit]
    items = []
    for i in image_ids:
        cats = sorted({a["category_id"] for a in gt.loadAnns(gt.getAnnIds(imgIds=[i], iscrowd=None))})
        reqs = tuple(SkillRequest("detect", None, object=names[c]) for c in cats)
        items.append(Item(str(i), Path(images) / gt.imgs[i]["file_name"], reqs))
    by_name = {v: k for k, v in names.items()}
    results, rows = [], []
    for row in run_batch(vl, items, (), concurrency=concurrency, progress=progress, total=len(items)):
        rows.append(row)
        if "result" not in row:
            continue
        info = gt.imgs[int(row["image"])]
        w, h = info["width"], info["height"]
        for k, o in enumerate(row["result"]["objects"]):
            box = [o["x_min"] * w, o["y_min"] * h, (o["x_max"] - o["x_min"]) * w, (o["y_max"] - o["y_min"]) * h]
            score = 1.0 if scoring is CocoScoring.MOONDREAM else 1.0 / (k + 1)
            cat = by_name[row["task"].split(":", 1)[1]]
            results.append(
                {"image_id": int(row["image"]), "category_id": cat, "bbox": [round(v, 2) for v in box], "score": score}
            )
    if predictions is not None:
        write_text_atomic(predictions, json.dumps(results))
    if details is not None:
        write_jsonl(details, rows)
    out = _scores(gt, results, image_ids, scoring, COCOeval)
    errors = [r for r in rows if "error" in r]
    return out | {
        "suite": "coco",
        "scoring": scoring.value,
        "model": vl.model.name,
        "n_images": len(image_ids),
        "n_queries": len(rows),
        "n_predictions": len(results),
        "n_errors": len(errors),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _scores(gt, results: list[dict], image_ids: list[int], scoring: CocoScoring, cocoeval) -> dict[str, Any]:
    """AP@[.5:.95] and AP@0.5, overall and per category (area all, 100 detections)."""
    cats = sorted({a["category_id"] for a in gt.loadAnns(gt.getAnnIds(imgIds=image_ids, iscrowd=False))})
    if not results:
        return {"ap": 0.0, "ap50": 0.0, "per_category": {gt.cats[c]["name"]: {"ap": 0.0, "ap50": 0.0} for c in cats}}
    with contextlib.redirect_stdout(io.StringIO()):
        e = cocoeval(gt, gt.loadRes(results), "bbox")
        e.params.imgIds, e.params.catIds = image_ids, cats
        e.evaluate()
        e.accumulate()
        e.summarize()
    precision = e.eval["precision"]  # [iou thresholds, recall points, categories, areas, max detections]
    per, weights = {}, []
    for k, c in enumerate(e.params.catIds):
        p = precision[:, :, k, 0, -1]
        per[gt.cats[c]["name"]] = {"ap": _mean(p), "ap50": _mean(p[0])}
        weights.append(len(gt.getAnnIds(imgIds=image_ids, catIds=[c], iscrowd=False)))
    if scoring is CocoScoring.MOONDREAM:
        w = np.array(weights, float)
        ap = float(np.dot([v["ap"] for v in per.values()], w) / w.sum())
        ap50 = float(np.dot([v["ap50"] for v in per.values()], w) / w.sum())
    else:
        ap, ap50 = float(e.stats[0]), float(e.stats[1])
    return {"ap": round(ap, 4), "ap50": round(ap50, 4), "per_category": per}


def _mean(p: np.ndarray) -> float:
    valid = p[p > -1]
    return round(float(valid.mean()), 4) if valid.size else 0.0
