import pytest

from moonbase.config import Defaults
from moonbase.errors import SettingsError
from moonbase.skills import (
    Prompt,
    caption_prompt,
    object_prompt,
    query_prompt,
    reasoning_output,
    region_output,
    resolve_settings,
    spatial_prompt,
)


def test_query_prompt_double_answer_token_and_reasoning(tiny):
    tok, t = tiny.tokenizer, tiny.cfg.tokenizer
    q = tok.encode("What is it?")
    assert query_prompt(tok, "What is it?").ids == t.query_prefix + tuple(q) + (3, 3)
    assert query_prompt(tok, "What is it?", reasoning=True).ids == t.query_prefix + tuple(q) + (3, 4)


def test_object_prompts_have_a_leading_space(tiny):
    tok, t = tiny.tokenizer, tiny.cfg.tokenizer
    assert object_prompt(tok, "detect", "red circle").ids == t.detect_prefix + tuple(tok.encode(" red circle")) + (3,)
    assert object_prompt(tok, "point", "dog").ids == t.point_prefix + tuple(tok.encode(" dog")) + (3,)


def test_spatial_refs_become_placeholders_with_values(tiny):
    p = spatial_prompt([[0.25, 0.75], [0.125, 0.25, 0.625, 0.875]], tiny.cfg.tokenizer)
    assert p == Prompt((5, 5, 5, 5, 6), (0.25, 0.75, 0.375, 0.5625), ((0.5, 0.625),))
    full = query_prompt(tiny.tokenizer, "this?", [[0.5, 0.5]])
    assert full.ids[3:5] == (5, 5) and full.coords == (0.5, 0.5)


@pytest.mark.parametrize(
    "refs",
    [[[0.5]], [[0.1, 0.2, 0.3]], [[1.5, 0.2]], [[0.5, 0.5, 0.1, 0.9]], "x", [["a", 0.1]], [[float("nan"), 0.1]], [[True, 0.1]]],
)
def test_bad_spatial_refs(refs, tiny):
    with pytest.raises(SettingsError):
        spatial_prompt(refs, tiny.cfg.tokenizer)


def test_caption_lengths(tiny):
    assert caption_prompt(tiny.cfg.tokenizer, "short").ids == tiny.cfg.tokenizer.caption["short"]
    with pytest.raises(SettingsError, match="length must be one of"):
        caption_prompt(tiny.cfg.tokenizer, "medium")


def test_settings_defaults_and_validation():
    d = Defaults()
    s = resolve_settings(None, d)
    assert (s.temperature, s.top_p, s.max_tokens, s.max_objects) == (0.5, 0.3, 768, 50)
    s = resolve_settings({"temperature": 0, "top_p": 1, "max_tokens": 5, "variant": None}, d)
    assert (s.temperature, s.top_p, s.max_tokens) == (0.0, 1.0, 5)
    for bad in [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"max_tokens": 0},
        {"max_tokens": 2.5},
        {"max_objects": True},
        {"temperature": "hot"},
        {"temperature": float("inf")},
        {"seed": "x"},
        {"max_token": 3},
    ]:
        with pytest.raises(SettingsError):
            resolve_settings(bad, d)


def test_reasoning_output_offsets(tiny):
    tok = tiny.tokenizer
    chunks = [(tok.encode(" I see"), []), ([7] + tok.encode(" a cat"), [0.25, 0.5]), ([9] + tok.encode(" here"), [])]
    out = reasoning_output(chunks, tok)
    assert out["text"] == " I see a cat here"
    assert out["grounding"] == [{"start_idx": 6, "end_idx": 12, "points": [[0.25, 0.5]]}]
    assert out["text"][6:12] == " a cat"


def test_region_output_is_not_clamped():
    assert region_output(0.05, 0.5, 0.2, 0.1) == pytest.approx({"x_min": -0.05, "y_min": 0.45, "x_max": 0.15, "y_max": 0.55})
