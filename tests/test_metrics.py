import pytest

from moonbase.metrics import Counts, exact_match, iou, match_boxes, match_points, parse_count, token_f1


def test_iou_by_hand():
    assert iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def test_box_matching_is_one_to_one():
    true = [(0, 0, 1, 1), (2, 0, 3, 1)]
    # two predictions on the same object: only one counts; the shifted one has IoU 1/3 < 0.5
    pred = [(0, 0, 1, 1), (0.05, 0, 1.05, 1), (2.5, 0, 3.5, 1)]
    assert match_boxes(pred, true) == 1
    c = Counts()
    c.add(match_boxes(pred, true), len(pred), len(true))
    assert (c.tp, c.fp, c.fn) == (1, 2, 1)
    assert c.f1 == pytest.approx(2 * 1 / (2 + 2 + 1))


def test_empty_cases():
    c = Counts()
    c.add(0, 0, 0)
    assert c.f1 == 1.0  # nothing to find, nothing found
    c.add(0, 2, 0)
    assert c.f1 == 0.0


def test_point_matching_finds_the_maximum_assignment():
    boxes = [(0, 0, 2, 2), (1, 1, 3, 3)]
    # the first point is inside both boxes, the second only in the first: a greedy pass could pair the
    # first point with the first box and lose the second; the maximum matching pairs both
    assert match_points([(1.5, 1.5), (0.5, 0.5)], boxes) == 2
    assert match_points([(0.5, 0.5), (0.6, 0.6)], boxes) == 1
    assert match_points([(5, 5)], boxes) == 0


def test_text_metrics():
    assert exact_match("Red.", "red") and not exact_match("red circle", "red")
    assert token_f1("a red circle", "the red circle") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "y") == 0.0
    assert parse_count("3") == 3 and parse_count("There are two.") == 2 and parse_count("none?") is None
    assert parse_count("no") == 0
