"""`moonbase eval --suite vqa|points|segment --data rows.jsonl`: the user's own labelled data, one JSON object
per line (paths relative to the file's folder):

* vqa: `{"image", "question", "answer"}` or `"answers": [...]` (TextVQA's ten human answers, DocVQA's
  accepted ones), scored with `--metric` (vqa_metrics.py). The question is sent with the prompt Moondream's
  own eval scripts use for that benchmark (PROMPTS; `--no-prompt` sends it bare).
* points: `{"image", "object", "boxes": [[x_min, y_min, x_max, y_max], ...]}` (normalized): F1 of the points
  that fall in a true box, matched one to one.
* segment: `{"image", "object", "path"}` (an SVG path in image-normalized units, as `segment` returns it)
  or `"bbox"`: mean mask IoU of the rasterized paths.

Requests run through the engine at `concurrency` images at once; every row's prediction and score can be
written with `--details`."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SettingsError
from ..image import load_image
from ..jobs import Item, run_batch
from ..jsonl import jsonl_rows, write_jsonl
from ..metrics import Counts, box_mask, mask_iou, match_points, path_mask
from ..skills import SkillRequest
from .vqa_metrics import anls, exact_match, relaxed_accuracy, vqa_score


class VqaMetric(str, Enum):
    RELAXED = "relaxed"  # ChartQA
    ANLS = "anls"  # DocVQA
    VQA = "vqa"  # TextVQA, VQA v2
    EXACT = "exact"  # CountBenchQA


# (prefix, suffix) of the question, as Moondream's eval scripts send it for each benchmark
PROMPTS = {
    VqaMetric.RELAXED: (
        "Analyze the chart carefully, consider both visual features and data values, and provide a precise answer "
        "without any additional explanation or formatting. ",
        "",
    ),
    VqaMetric.ANLS: ("", " The answer should be a short text span taken verbatim from the document."),
    VqaMetric.VQA: (
        "Read the text in the image and provide a brief lowercase answer. Respond 'unanswerable' only if there is "
        "no plausible answer. ",
        "",
    ),
    VqaMetric.EXACT: (
        "Look at the image carefully and count the objects. Answer with just a number, without any additional text. ",
        "",
    ),
}

# a prediction against a row's accepted answers (one, or a benchmark's several)
SCORES: dict[VqaMetric, Callable[[str, list[str]], float]] = {
    VqaMetric.RELAXED: lambda pred, answers: max(relaxed_accuracy(pred, a) for a in answers),
    VqaMetric.ANLS: anls,
    VqaMetric.VQA: vqa_score,
    VqaMetric.EXACT: lambda pred, answers: max(exact_match(pred, a) for a in answers),
}


def _rows(path: Path, limit: int | None, need: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for n, row in jsonl_rows(path):
        missing = [k for k in need if not any(alt in row for alt in k.split("|"))] if isinstance(row, dict) else need
        if missing:
            raise SettingsError(f"{path}:{n}: each row needs {', '.join(need)} (missing {', '.join(missing)})")
        rows.append(row | {"_where": f"{path.name}:{n}"})
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise SettingsError(f"{path}: no rows")
    return rows


def _run(vl, path: Path, rows, request: Callable[[dict], SkillRequest], concurrency: int, progress: bool) -> dict[str, dict]:
    items = [Item(r["_where"], path.parent / r["image"], (request(r),)) for r in rows]
    return {row["image"]: row for row in run_batch(vl, items, (), concurrency=concurrency, progress=progress, total=len(items))}


def _finish(suite: str, vl, scores: list[float], details: list[dict], out_path, t0: float, **extra) -> dict[str, Any]:
    if out_path is not None:
        write_jsonl(out_path, details)
    return {
        "suite": suite,
        "model": vl.model.name,
        **extra,
        "n": len(scores),
        "n_errors": sum("error" in d for d in details),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def evaluate_vqa(vl, data, metric=VqaMetric.EXACT, prompt=True, limit=None, details=None, concurrency=32, progress=True):
    t0, path = time.perf_counter(), Path(data)
    rows = _rows(path, limit, ("image", "question", "answer|answers"))
    prefix, suffix = PROMPTS[metric] if prompt else ("", "")
    out = _run(
        vl, path, rows, lambda r: SkillRequest("query", None, question=prefix + r["question"] + suffix), concurrency, progress
    )
    scores, kept = [], []
    for r in rows:
        res = out[r["_where"]]
        answers = r["answers"] if "answers" in r else [r["answer"]]
        pred = res["result"]["answer"] if "result" in res else ""
        score = SCORES[metric](pred, answers)
        scores.append(score)
        kept.append({"row": r["_where"], "question": r["question"], "prediction": pred, "answers": answers, "score": score}
                    | ({"error": res["error"]} if "error" in res else {}))  # fmt: skip
    mean = round(float(np.mean(scores)), 4)
    return _finish("vqa", vl, scores, kept, details, t0, metric=metric.value, score=mean, prompt=prompt)


def evaluate_points(vl, data, limit=None, details=None, concurrency=32, progress=True):
    t0, path = time.perf_counter(), Path(data)
    rows = _rows(path, limit, ("image", "object", "boxes"))
    out = _run(vl, path, rows, lambda r: SkillRequest("point", None, object=r["object"]), concurrency, progress)
    counts, scores, kept = Counts(), [], []
    for r in rows:
        res = out[r["_where"]]
        pts = [(p["x"], p["y"]) for p in res.get("result", {}).get("points", [])]
        boxes = [tuple(b) for b in r["boxes"]]
        tp = match_points(pts, boxes)
        counts.add(tp, len(pts), len(boxes))
        scores.append(float(tp == len(pts) == len(boxes)))
        kept.append({"row": r["_where"], "object": r["object"], "points": pts, "hits": tp, "true": len(boxes)}
                    | ({"error": res["error"]} if "error" in res else {}))  # fmt: skip
    return _finish(
        "points",
        vl,
        scores,
        kept,
        details,
        t0,
        point_f1=round(counts.f1, 4),
        all_right=round(float(np.mean(scores)), 4),
        counts=vars(counts),
    )


def evaluate_segment(vl, data, limit=None, details=None, concurrency=32, progress=True):
    t0, path = time.perf_counter(), Path(data)
    rows = _rows(path, limit, ("image", "object", "path|bbox"))
    out = _run(vl, path, rows, lambda r: SkillRequest("segment", None, object=r["object"]), concurrency, progress)
    scores, kept = [], []
    for r in rows:
        res = out[r["_where"]]
        h, w = load_image(path.parent / r["image"]).shape[:2]
        pred_path = res.get("result", {}).get("path") or ""
        pred = path_mask(pred_path, w, h) if pred_path else np.zeros((h, w), bool)
        if r.get("path"):
            true = path_mask(r["path"], w, h)
        else:
            b = r["bbox"]
            true = box_mask((b["x_min"], b["y_min"], b["x_max"], b["y_max"]) if isinstance(b, dict) else tuple(b), w, h)
        scores.append(mask_iou(pred, true))
        kept.append({"row": r["_where"], "object": r["object"], "path": pred_path, "iou": scores[-1]}
                    | ({"error": res["error"]} if "error" in res else {}))  # fmt: skip
    return _finish("segment", vl, scores, kept, details, t0, mask_iou=round(float(np.mean(scores)), 4))
