"""Segment outlines: the synthetic shapes' exact outlines as Moondream 3 path text, rasterized (cairosvg) onto the
shapes they describe; mask IoU; the command line's `segment --draw`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moonbase.cli import main
from moonbase.data.shapes import COLORS, SHAPES, outline_path, render_scene
from moonbase.draw import annotate
from moonbase.errors import TuningError
from moonbase.hub import save_dir
from moonbase.metrics import mask_iou, path_mask
from moonbase.skills.segment import absolute_path, parse_path, relative_tokens


def _drawn_mask(scene, shape) -> np.ndarray:
    """The pixels painted in the shape's colour."""
    arr = np.asarray(scene.image).astype(int)
    return np.abs(arr - np.array(COLORS[shape.color])).sum(-1) < 40


@pytest.mark.parametrize("kind", SHAPES)
def test_outline_paths_rasterize_onto_the_drawn_shapes(kind):
    scene = next(s for seed in range(200) if (s := render_scene(seed, n_objects=1)).shapes and s.shapes[0].kind == kind)
    shape = scene.shapes[0]
    x0, y0, x1, y1 = shape.box
    commands, error = parse_path(outline_path(kind).split(" "))
    assert error is None
    path = absolute_path(commands, {"x_min": x0, "y_min": y0, "x_max": x1, "y_max": y1})
    w, h = scene.image.size
    mask = path_mask(path, w, h)
    iou = mask_iou(mask, _drawn_mask(scene, shape))
    assert iou > 0.9, (kind, iou)
    changed = np.any(np.asarray(annotate(scene.image, paths=[path])) != np.asarray(scene.image), axis=-1)
    assert mask_iou(changed, mask) > 0.99  # --draw fills exactly the path


def test_mask_iou():
    a, b = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    assert mask_iou(a, b) == 1.0
    a[:2], b[1:3] = True, True
    assert mask_iou(a, b) == pytest.approx(4 / 12)


def test_cli_segment_prints_the_path_and_draws_it(tmp_path, tiny3, tiny, capsys):
    image = tmp_path / "scene.png"
    render_scene(3).image.save(image)
    model = save_dir(tiny3, tmp_path / "md3")
    out = tmp_path / "drawn.png"
    assert main(["segment", str(image), "circle", "--model", str(model), "--draw", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"path", "bbox"} and out.is_file()
    assert main(["segment", str(image), "circle", "--model", str(save_dir(tiny, tmp_path / "md2"))]) != 0
    assert "segmentation head" in capsys.readouterr().err


def test_a_segment_target_round_trips_through_the_models_tokens(tiny3):
    """relative_tokens inverts absolute_path; teaching gives coord, coord, size, then one token per path token."""
    from moonbase.skills import SkillRequest
    from moonbase.skills.program import Head
    from moonbase.skills.training import Target

    bbox = {"x_min": 0.2, "y_min": 0.4, "x_max": 0.6, "y_max": 0.6}
    tokens = ["M", "0", "0", "L", "9", "0", "l", "-", "5", "9", "Z"]
    path = absolute_path(parse_path(tokens)[0], bbox)
    assert relative_tokens(path, bbox) == tokens
    req = SkillRequest("segment", None, object="circle")
    prompt, moves = req.skill.teach(req, Target(path, boxes=((0.2, 0.4, 0.6, 0.6),)), tiny3.tokenizer, tiny3.cfg)
    tok = tiny3.cfg.tokenizer
    assert [m.head for m in moves[:6]] == [Head.LM, Head.COORD, Head.LM, Head.COORD, Head.LM, Head.SIZE]
    assert [m.label for m in moves[:6:2]] == [tok.coord_id, tok.coord_id, tok.size_id]
    assert [tiny3.tokenizer.decode([m.label]) for m in moves[6:-1]] == tokens and moves[-1].label == tok.eos_id
    with pytest.raises(TuningError, match="no single token"):  # byte-level: "480" is three tokens, 0-9 are far
        req.skill.teach(req, Target("M 0.4 0.5 Z", boxes=((0.2, 0.4, 0.6, 0.6),)), tiny3.tokenizer, tiny3.cfg)


def test_segment_rewards_are_mask_iou_against_a_path_or_a_box():
    from moonbase.skills import get
    from moonbase.skills.training import Target

    seg = get("segment")
    square = "M 0.25 0.25 L 0.75 0.25 L 0.75 0.75 L 0.25 0.75 Z"
    assert seg.reward({"path": square}, Target(square, boxes=((0.25, 0.25, 0.75, 0.75),))) == pytest.approx(1.0)
    assert seg.reward({"path": square}, Target(None, boxes=((0.25, 0.25, 0.75, 0.75),))) == pytest.approx(1.0, abs=0.02)
    assert seg.reward({"path": square}, Target(None, boxes=((0.5, 0.25, 1.0, 0.75),))) == pytest.approx(1 / 3, abs=0.02)
    assert seg.reward({"path": ""}, Target(square, boxes=((0.25, 0.25, 0.75, 0.75),))) == 0.0


def test_sft_teaches_a_moondream3_to_segment(tiny3):
    """A few SFT steps on one target: the engine's greedy segment gives back its bbox and its path tokens."""
    from moonbase.api import VL
    from moonbase.finetune.lora import LoraConfig
    from moonbase.finetune.trainer import Trainer
    from moonbase.finetune.types import SFTGroup
    from moonbase.hub import tiny_random
    from moonbase.skills import SkillRequest
    from moonbase.skills.training import Target

    m = tiny_random(seed=3, moondream3=True)
    image = render_scene(5, n_objects=1).image
    bbox = {"x_min": 0.2, "y_min": 0.4, "x_max": 0.6, "y_max": 0.6}
    tokens = ["M", "0", "0", "L", "9", "0", "L", "9", "9", "Z"]
    target = Target(absolute_path(parse_path(tokens)[0], bbox), boxes=(tuple(bbox.values()),))
    trainer = Trainer(m, LoraConfig(rank=8, train_region=True))
    for _ in range(60):
        trainer.train_step([SFTGroup(SkillRequest("segment", image, object="circle"), target)], lr=1e-2)
    vl = VL(m)
    vl.engine.adapters.register(trainer.adapter("seg"))
    got = vl.segment(image, "circle", settings={"variant": "seg", "max_tokens": 16})
    assert got["bbox"] == pytest.approx(bbox, abs=4 / 256)  # coordinate and size bins of this tiny config
    assert relative_tokens(got["path"], got["bbox"]) == tokens


def test_segment_rows_in_a_data_file(tmp_path):
    from moonbase.finetune.data import load_jsonl

    render_scene(1).image.save(tmp_path / "a.png")
    row = {"image": "a.png", "object": "star", "path": "M 0.1 0.1 L 0.2 0.1 Z", "bbox": [0.1, 0.1, 0.2, 0.2]}
    (tmp_path / "d.jsonl").write_text(
        json.dumps(row) + "\n" + json.dumps({"image": "a.png", "object": "x", "path": "M", "skill": "segment"})
    )
    with pytest.raises(TuningError, match=r"d.jsonl:2: .*bbox is required"):
        load_jsonl(tmp_path / "d.jsonl")
    (tmp_path / "d.jsonl").write_text(json.dumps(row))
    (ex,) = load_jsonl(tmp_path / "d.jsonl")
    assert ex.request.skill.name == "segment" and ex.target.answer == row["path"] and ex.target.boxes == ((0.1, 0.1, 0.2, 0.2),)


def test_an_edited_segment_rollout_is_refused(tiny3):
    from moonbase.skills import SkillRequest
    from moonbase.skills.training import Rollout

    req = SkillRequest("segment", None, object="x")
    tok = tiny3.cfg.tokenizer
    with pytest.raises(TuningError, match="one coords bin per coord token"):
        req.skill.replay(req, Rollout(answer_tokens=(tok.coord_id, tok.coord_id, 50), coords=(3,)), tiny3.tokenizer, tiny3.cfg)


def test_outline_in_image_units_is_the_outline_mapped_through_its_box():
    from moonbase.data.shapes import outline_in

    box = (0.1, 0.2, 0.5, 0.8)
    for kind in SHAPES:
        mapped = absolute_path(
            parse_path(outline_path(kind).split(" "))[0], dict(zip(("x_min", "y_min", "x_max", "y_max"), box, strict=True))
        )
        assert mask_iou(path_mask(outline_in(kind, box), 200, 100), path_mask(mapped, 200, 100)) > 0.99


def test_the_synthetic_suite_scores_segment_on_models_that_segment(tiny3, tiny):
    from moonbase.api import VL
    from moonbase.eval.synthetic import evaluate

    small = {"n_scenes": 3, "n_captcha": 1, "n_text": 1, "progress": False, "max_tokens": 8, "max_objects": 2}
    md3 = evaluate(VL(tiny3), seed=5, **small)
    assert md3["n_examples"]["segment_miou"] >= 1 and 0.0 <= md3["segment_miou"] <= 1.0  # shapes with a unique label
    assert 0.0 <= md3["segment_bbox_iou"] <= 1.0
    md2 = evaluate(VL(tiny), seed=5, **small)
    assert md2["segment_miou"] is None and md2["n_examples"].get("segment_miou", 0) == 0


def test_segment_tasks_name_one_shape_by_label_kind_or_colour():
    from moonbase.data.scenes import matches, scene_example

    phrases = []
    for seed in range(60):
        ex = scene_example(seed, segment_tasks=1)
        shapes = render_scene(seed).shapes
        for task in (t for t in ex.tasks if t.skill == "segment"):
            hits = [s for s in shapes if matches(s, task.arg)]
            assert len(hits) == 1 and task.boxes == (hits[0].box,), task.arg
            phrases.append(len(task.arg.split()) == 1 or task.arg.endswith(" shape"))
    assert len(phrases) >= 50 and 0.2 < sum(phrases) / len(phrases) < 0.9  # kinds and colours alone, not only labels
