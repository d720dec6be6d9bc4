"""The synthetic evaluation suite: held-out examples from the generators, scored per skill.

python -m moonbase eval --model nano --suite synthetic --seed 1 --json
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm import tqdm

from ..api import VL
from ..data.mix import synthetic_example
from ..metrics import Counts, exact_match, iou, mask_iou, match_boxes, match_points, parse_count, path_mask, token_f1
from ..skills import SkillRequest

GREEDY = {"temperature": 0.0, "top_p": 1.0}


def evaluate(
    vl: VL,
    seed: int,
    n_scenes: int = 150,
    n_captcha: int = 60,
    n_text: int = 60,
    progress: bool = True,
    max_tokens: int = 96,
    max_objects: int = 20,
    concurrency: int = 16,
) -> dict[str, Any]:
    """Score `vl` on held-out examples of seed `seed`. Greedy decoding, so the numbers do not depend on
    `concurrency` (images evaluated at once; the engine batches them)."""
    examples = [synthetic_example("eval", seed, i, "shapes", segment_tasks=1) for i in range(n_scenes)]
    examples += [synthetic_example("eval", seed, n_scenes + i, "captcha") for i in range(n_captcha)]
    examples += [synthetic_example("eval", seed, n_scenes + n_captcha + i, "text") for i in range(n_text)]
    scores: dict[str, list[float]] = defaultdict(list)
    boxes, points = Counts(), Counts()
    multi_boxes = Counts()  # detect queries whose phrase matches two or more shapes: the "another object?" decisions
    settings = {**GREEDY, "max_tokens": max_tokens, "max_objects": max_objects}
    lock = threading.Lock()

    def text(task, out) -> None:
        if "caption" in out:
            scores["caption"].append(token_f1(out["caption"], task.answer))
        elif task.kind == "count":
            scores["count"].append(float(parse_count(out["answer"]) == int(task.answer)))
        else:
            scores[task.kind].append(float(exact_match(out["answer"], task.answer)))

    def located(task, out) -> None:
        if "objects" in out:
            pred = [(o["x_min"], o["y_min"], o["x_max"], o["y_max"]) for o in out["objects"]]
            tp = match_boxes(pred, list(task.boxes))
            boxes.add(tp, len(pred), len(task.boxes))
            if len(task.boxes) >= 2:
                multi_boxes.add(tp, len(pred), len(task.boxes))
        else:
            pts = [(p["x"], p["y"]) for p in out["points"]]
            points.add(match_points(pts, list(task.boxes)), len(pts), len(task.boxes))
        scores[f"{task.kind}_queries"].append(1.0)

    def segmented(task, out, image) -> None:
        h, w = image.shape[:2]
        pred = path_mask(out["path"], w, h) if out["path"] else np.zeros((h, w), bool)
        scores["segment_miou"].append(mask_iou(pred, path_mask(task.answer, w, h)))
        box = out.get("bbox")
        scores["segment_bbox_iou"].append(iou(tuple(box.values()) if box else (0, 0, 0, 0), task.boxes[0]))

    def score(ex) -> None:  # one image's tasks, in order; several images run at once and batch in the engine
        for task in ex.tasks:  # the engine caches the image prefix: only the first task pays for vision
            req = SkillRequest.of(task.skill, ex.image, task.arg, settings=settings)
            if not req.skill.supports(vl.model.cfg):
                continue  # segment on a model without a segmentation head: reported as None
            out = vl.run(req)
            with lock:
                if "path" in out:
                    segmented(task, out, ex.image)
                else:
                    (located if "objects" in out or "points" in out else text)(task, out)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(tqdm(pool.map(score, examples), total=len(examples), desc="eval", unit="image", disable=not progress))
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {
        "suite": "synthetic",
        "seed": seed,
        "model": vl.model.name,
        "detect_f1": round(boxes.f1, 4),
        "detect_multi_f1": round(multi_boxes.f1, 4),
        "point_accuracy": round(points.f1, 4),
        "count_accuracy": mean(scores["count"]),
        "qa_accuracy": mean(scores["qa"]),
        "caption_f1": mean(scores["caption"]),
        "captcha_accuracy": mean(scores["captcha"]),
        "text_accuracy": mean(scores["text"]),
        "segment_miou": mean(scores["segment_miou"]),  # mask IoU of the rasterized paths (models that segment)
        "segment_bbox_iou": mean(scores["segment_bbox_iou"]),
        "n_examples": {"images": len(examples), **{k: len(v) for k, v in scores.items()}},
        "detect_counts": vars(boxes),
        "detect_multi_counts": vars(multi_boxes),
        "point_counts": vars(points),
        "seconds": round(time.perf_counter() - t0, 1),
    }
