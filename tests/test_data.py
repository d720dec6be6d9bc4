import numpy as np
import pytest

from moonbase.data.captcha import captcha_example
from moonbase.data.mix import example_seed, synthetic_example
from moonbase.data.scenes import captions, matches, scene_example
from moonbase.data.shapes import render_scene
from moonbase.data.text import text_example


@pytest.mark.parametrize("make", [scene_example, captcha_example, text_example])
def test_generators_are_reproducible(make):
    a, b, c = make(11), make(11), make(12)
    assert np.array_equal(a.image, b.image) and a.tasks == b.tasks
    assert not np.array_equal(a.image, c.image) or a.tasks != c.tasks
    assert a.image.dtype == np.uint8 and a.image.ndim == 3 and a.image.shape[2] == 3


def test_scene_labels_are_exact():
    for seed in range(40):
        scene = render_scene(seed)
        assert 1 <= len(scene.shapes) <= 8
        for s in scene.shapes:
            x0, y0, x1, y1 = s.box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            # the drawn pixel at the centre of a circle or square has the shape's colour
            if s.kind in ("circle", "square"):
                h, w = scene.image.height, scene.image.width
                px = np.asarray(scene.image)[int(s.cy * h), int(s.cx * w)]
                assert (
                    np.abs(px.astype(int) - np.array(__import__("moonbase.data.shapes").data.shapes.COLORS[s.color])).max() <= 1
                )
        ex = scene_example(seed)
        for t in ex.tasks:
            if t.kind == "count":
                noun = t.arg[len("How many ") : -len(" are there?")]
                phrase = noun[:-1] if noun.endswith("s") else noun
                assert int(t.answer) == sum(matches(s, phrase) for s in scene.shapes)
            if t.skill in ("detect", "point"):
                assert list(t.boxes) == sorted(t.boxes, key=lambda b: (b[0] + b[2]) / 2)
                assert len(t.boxes) == sum(matches(s, t.arg) for s in scene.shapes)


def test_zero_match_phrases_occur():
    empty = [t for s in range(60) for t in scene_example(s).tasks if t.skill == "detect" and not t.boxes]
    assert empty


def test_phrase_mix_chooses_the_kind_of_object_phrase():
    def phrases(mix):
        return [t.arg for s in range(20) for t in scene_example(s, locate_tasks=8, phrase_mix=mix).tasks if t.skill == "detect"]

    assert all(p.endswith(" shape") for p in phrases((0, 0, 1, 0)))
    assert all(" " not in p for p in phrases((0, 3, 0, 0)))  # weights need not sum to 1


def test_drills_add_extremes_and_count_questions_after_the_scene_tasks():
    extremes, counts = [], []
    for seed in range(40):
        plain, drilled = scene_example(seed), scene_example(seed, drills=2)
        assert drilled.tasks[: len(plain.tasks)] == plain.tasks  # held-out streams (no drills) do not move
        scene = render_scene(seed)
        for t in drilled.tasks[len(plain.tasks) :]:
            if t.kind == "count":
                phrase = t.arg[len("How many ") : -len("s are there?")]
                assert " " not in phrase or phrase.endswith(" shape")  # a kind or a colour alone
                assert int(t.answer) == sum(matches(s, phrase) for s in scene.shapes)
                counts.append(int(t.answer))
            else:
                assert t.arg.startswith("Which shape is the ")
                which = t.arg[len("Which shape is the ") : -1]
                side = {"leftmost": (min, "cx"), "rightmost": (max, "cx"), "topmost": (min, "cy"), "bottommost": (max, "cy")}
                if which in side:
                    pick, attr = side[which]
                    assert t.answer == pick(scene.shapes, key=lambda s: getattr(s, attr)).label
                extremes.append(t)
    assert len(extremes) >= 20 and max(counts) >= 2 and min(counts) >= 1  # zero is the main count question's


def test_captions_have_three_lengths():
    c = captions(render_scene(3, n_objects=2))
    assert len(c["short"]) < len(c["normal"]) < len(c["long"])
    assert c["short"].startswith("Two shapes")


def test_captcha_and_text_answers():
    ex = captcha_example(5)
    assert ex.tasks[0].answer.isdigit() and 3 <= len(ex.tasks[0].answer) <= 5
    assert text_example(5).tasks[0].answer.replace(" ", "").isalpha()


def test_splits_never_share_seeds():
    assert example_seed("train", 0, 5) != example_seed("eval", 0, 5)
    assert synthetic_example("eval", 1, 3).tasks == synthetic_example("eval", 1, 3).tasks
