"""`moonbase eval`: the synthetic suite, or the user's data in standard formats (COCO, VQA JSONL, points,
segment); one JSON object of metrics, counts and seconds."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

SUITES = ("synthetic", "coco", "vqa", "points", "segment")


def add_parser(sub, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("eval", help="evaluate a model: the synthetic suite, COCO detection, VQA, points, segment")
    p.add_argument("--suite", default="synthetic", choices=SUITES)
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    p.add_argument("--limit", type=int, help="evaluate only the first N images (coco) or rows")
    p.add_argument("--details", metavar="OUT.jsonl", help="write every example's prediction and score")
    p.add_argument("--concurrency", type=int, default=32, help="images in flight at once (default 32)")
    g = p.add_argument_group("synthetic")
    for flag, default in (("--seed", 1), ("--scenes", 150), ("--captchas", 60), ("--texts", 60)):
        g.add_argument(flag, type=int, default=default)
    g = p.add_argument_group("coco")
    g.add_argument("--annotations", metavar="instances.json", help="COCO annotations")
    g.add_argument("--images", metavar="DIR", help="the images the annotations name")
    g.add_argument("--scoring", default="standard", choices=("standard", "moondream"), help="see docs/eval.md")
    g.add_argument("--predictions", metavar="OUT.json", help="write the detections in COCO results format")
    g = p.add_argument_group("vqa, points, segment")
    g.add_argument("--data", metavar="rows.jsonl", help="one example per line (see docs/eval.md)")
    g.add_argument("--metric", default="exact", choices=("relaxed", "anls", "vqa", "exact"), help="vqa: the score")
    g.add_argument("--no-prompt", action="store_true", help="vqa: send the bare question (no benchmark prompt)")
    model_args(p)
    p.set_defaults(fn=cmd_eval)


def cmd_eval(a: argparse.Namespace) -> int:
    from ..cli import vl_from_args
    from ..errors import SettingsError

    needs = {"coco": ("annotations", "images"), "vqa": ("data",), "points": ("data",), "segment": ("data",)}
    missing = [f"--{k}" for k in needs.get(a.suite, ()) if getattr(a, k) is None]
    if missing:
        raise SettingsError(f"--suite {a.suite} needs {' and '.join(missing)}")
    vl, progress = vl_from_args(a), not a.json
    common = dict(limit=a.limit, details=a.details, concurrency=a.concurrency, progress=progress)
    if a.suite == "synthetic":
        from .synthetic import evaluate

        result = evaluate(vl, a.seed, a.scenes, a.captchas, a.texts, progress=progress)
    elif a.suite == "coco":
        from .coco import CocoScoring, evaluate_coco

        result = evaluate_coco(vl, a.annotations, a.images, CocoScoring(a.scoring), predictions=a.predictions, **common)
    elif a.suite == "vqa":
        from .suites import VqaMetric, evaluate_vqa

        result = evaluate_vqa(vl, a.data, VqaMetric(a.metric), prompt=not a.no_prompt, **common)
    else:
        from .suites import evaluate_points, evaluate_segment

        result = (evaluate_points if a.suite == "points" else evaluate_segment)(vl, a.data, **common)
    print(json.dumps(result, indent=None if a.json else 2))
    return 0
