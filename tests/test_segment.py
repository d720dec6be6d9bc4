"""Segment outlines: the synthetic shapes' exact outlines as Moondream 3 path text, rasterized (cairosvg) onto the
shapes they describe; mask IoU; the command line's `segment --draw`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moonbase.cli import main
from moonbase.data.shapes import COLORS, SHAPES, outline_path, render_scene
from moonbase.draw import annotate, path_mask
from moonbase.hub import save_dir
from moonbase.metrics import mask_iou
from moonbase.skills.segment import absolute_path, parse_path


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
