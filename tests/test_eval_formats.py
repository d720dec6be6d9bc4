"""`moonbase eval` on standard formats: COCO detection scored by pycocotools (checked against pycocotools run
directly on the written predictions), the VQA metrics on hand-computed cases, and the JSONL suites end to end."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from moonbase.cli import main
from moonbase.data.shapes import SHAPES, outline_in, render_scene
from moonbase.eval.vqa_metrics import anls, exact_match, normalize_answer, relaxed_accuracy, vqa_score


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """12 synthetic scenes as a COCO dataset: categories are the shape kinds, boxes the exact drawn extents."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    images, annotations = [], []
    for i in range(12):
        scene = render_scene(500 + i, max_objects=4)
        scene.image.save(root / "images" / f"{i}.png")
        w, h = scene.image.size
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        for s in scene.shapes:
            x0, y0, x1, y1 = s.box
            box = [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": SHAPES.index(s.kind) + 1,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})  # fmt: skip
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(SHAPES)]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def _eval(argv: list[str], capsys) -> dict:
    assert main(["eval", *argv, "--json", "--model", "nano"]) == 0
    return json.loads(capsys.readouterr().out)


def test_coco_metrics_are_pycocotools_on_the_written_predictions(coco, tmp_path, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    pred = tmp_path / "pred.json"
    args = ["--suite", "coco", "--annotations", str(coco / "instances.json"), "--images", str(coco / "images")]
    result = _eval(args + ["--predictions", str(pred), "--details", str(tmp_path / "d.jsonl")], capsys)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco / "instances.json"))
        e = COCOeval(gt, gt.loadRes(str(pred)), "bbox")
        e.evaluate(), e.accumulate(), e.summarize()
    assert result["ap"] == round(e.stats[0], 4) and result["ap50"] == round(e.stats[1], 4)
    assert result["ap50"] > 0.8  # nano finds its shapes
    assert set(result["per_category"]) == set(SHAPES) and result["n_queries"] == len(
        (tmp_path / "d.jsonl").read_text().splitlines()
    )
    scores = [p["score"] for p in json.loads(pred.read_text())]
    assert max(scores) == 1.0 and min(scores) < 1.0  # standard: the k-th box of an answer scores 1 / k

    weighted = _eval(args + ["--scoring", "moondream", "--predictions", str(pred)], capsys)
    assert {p["score"] for p in json.loads(pred.read_text())} == {1.0}
    counts = {c["name"]: len(gt.getAnnIds(catIds=[c["id"]])) for c in gt.loadCats(gt.getCatIds())}
    want = sum(weighted["per_category"][k]["ap"] * n for k, n in counts.items()) / sum(counts.values())
    assert weighted["ap"] == pytest.approx(want, abs=1e-3)


def test_relaxed_accuracy_edge_cases():
    assert relaxed_accuracy("10.5", "10") == 1.0 and relaxed_accuracy("10.51", "10") == 0.0  # 5% of the target
    assert relaxed_accuracy("9.5", "10") == 1.0 and relaxed_accuracy("-10.2", "-10") == 1.0
    assert relaxed_accuracy("50%", "0.5") == 1.0 and relaxed_accuracy("0.5", "50%") == 1.0  # % divides by 100
    assert relaxed_accuracy("0.01", "0") == 0.0 and relaxed_accuracy("0", "0") == 1.0  # a zero target: exact match
    assert relaxed_accuracy(" Yes ", "yes") == 1.0 and relaxed_accuracy("yes.", "yes") == 0.0
    assert relaxed_accuracy("1,000", "1000") == 0.0  # not a number to float(): strings compared


def test_anls_thresholds():
    assert anls("hello", ["hallo"]) == pytest.approx(0.8)  # 1 edit of 5
    assert anls("abcd", ["abxy"]) == 0.0  # NL = 0.5 reaches tau: zero
    assert anls("abcde", ["abxye"]) == pytest.approx(0.6)  # NL = 0.4 < 0.5
    assert anls("Total", ["total "]) == 1.0  # case and surrounding space do not count
    assert anls("cat", ["dog", "cat"]) == 1.0 and anls("", [""]) == 1.0  # the best accepted answer


def test_vqa_score_over_ten_human_answers():
    assert vqa_score("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # 3 of 10: 2/3 in 3 subsets, 1 in 7
    assert vqa_score("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert vqa_score("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    assert vqa_score("2", ["2"] * 4 + ["3"] * 6) == 1.0 and vqa_score("4", ["2"] * 10) == 0.0
    assert vqa_score("Two.", ["2"] * 10) == 1.0  # number words, case and the period are normalized
    assert normalize_answer("The red car!") == "red car" and normalize_answer("dont") == "don't"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("1,000 dogs") == "1000 dogs"
    assert exact_match(" 7\n", "7") == 1.0 and exact_match("seven", "7") == 0.0


def test_vqa_points_and_segment_suites_on_synthetic_rows(tmp_path, capsys):
    vqa, points, segments = [], [], []
    for i in range(8):
        scene = render_scene(900 + i, max_objects=3)
        name = f"{i}.png"
        scene.image.save(tmp_path / name)
        n = sum(s.kind == "circle" for s in scene.shapes)
        vqa.append({"image": name, "question": "How many circles are there?", "answer": str(n)})
        s = scene.shapes[0]
        same = [o.box for o in scene.shapes if o.label == s.label]
        points.append({"image": name, "object": s.label, "boxes": [list(b) for b in same]})
        segments.append({"image": name, "object": s.label, "path": outline_in(s.kind, s.box)})
    for rows, file in ((vqa, "vqa.jsonl"), (points, "points.jsonl"), (segments, "seg.jsonl")):
        (tmp_path / file).write_text("".join(json.dumps(r) + "\n" for r in rows))

    details = tmp_path / "details.jsonl"
    result = _eval(
        ["--suite", "vqa", "--data", str(tmp_path / "vqa.jsonl"), "--metric", "exact", "--details", str(details)], capsys
    )
    rows = [json.loads(line) for line in details.read_text().splitlines()]
    assert result["n"] == 8 and result["score"] == pytest.approx(sum(r["score"] for r in rows) / 8, abs=1e-4)
    assert all(r["score"] == float(r["prediction"].strip() == r["answers"][0]) for r in rows)
    bare = _eval(["--suite", "vqa", "--data", str(tmp_path / "vqa.jsonl"), "--metric", "exact", "--no-prompt"], capsys)
    assert bare["score"] >= 0.5 and not bare["prompt"]  # nano counts circles when asked as it was taught
    result = _eval(["--suite", "points", "--data", str(tmp_path / "points.jsonl")], capsys)
    assert result["n"] == 8 and result["point_f1"] >= 0.7
    result = _eval(["--suite", "segment", "--data", str(tmp_path / "seg.jsonl"), "--limit", "3"], capsys)
    assert result["n"] == 3 and result["mask_iou"] >= 0.6  # nano outlines its shapes


def test_bad_eval_input_names_file_and_line(tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text('{"image": "a.png", "question": "q?", "answer": "1"}\n{"image": "b.png"}\n')
    assert main(["eval", "--suite", "vqa", "--data", str(tmp_path / "rows.jsonl"), "--model", "nano"]) == 2
    assert "rows.jsonl:2" in capsys.readouterr().err
    assert main(["eval", "--suite", "coco", "--model", "nano"]) == 2
    assert "--annotations and --images" in capsys.readouterr().err


def test_a_finetune_and_its_base_compare_in_two_commands(tmp_path, capsys, monkeypatch):
    rows = []
    for i in range(4):
        render_scene(700 + i).image.save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "What is the secret word?", "answer": "zebra"})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    store = tmp_path / "store"
    argv = ["finetune", "sft", str(tmp_path / "rows.jsonl"), "--store", str(store), "--model", "nano"]
    assert main(argv + ["--steps", "30", "--batch", "4", "--lr", "1e-2", "--held-out", "0"]) == 0
    model = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"]  # nano/<finetune_id>@<step>
    monkeypatch.setenv("MOONBASE_FINETUNES", str(store))
    data = ["--suite", "vqa", "--data", str(tmp_path / "rows.jsonl"), "--metric", "exact", "--no-prompt"]
    assert _eval(data, capsys)["score"] == 0.0
    assert main(["eval", *data, "--json", "--model", model]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == 1.0
