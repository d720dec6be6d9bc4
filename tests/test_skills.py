import pytest

from moonbase.config import Defaults
from moonbase.errors import SettingsError
from moonbase.skills import REGISTRY, Prompt, SkillRequest, get, parse_request, resolve_settings, spatial_prompt
from moonbase.skills.locate import box
from moonbase.skills.program import RegionObject, TextRun
from moonbase.skills.query import reasoning_output


def _prompt(tiny, skill, **kw):
    req = SkillRequest(skill, **kw)
    return req.skill.prompt(req, tiny.tokenizer)


def test_query_prompt_double_answer_token_and_reasoning(tiny):
    tok, t = tiny.tokenizer, tiny.cfg.tokenizer
    q = tok.encode("What is it?")
    assert _prompt(tiny, "query", question="What is it?").ids == t.query_prefix + tuple(q) + (3, 3)
    assert _prompt(tiny, "query", question="What is it?", reasoning=True).ids == t.query_prefix + tuple(q) + (3, 4)


def test_object_prompts_have_a_leading_space(tiny):
    tok, t = tiny.tokenizer, tiny.cfg.tokenizer
    assert _prompt(tiny, "detect", object="red circle").ids == t.detect_prefix + tuple(tok.encode(" red circle")) + (3,)
    assert _prompt(tiny, "point", object="dog").ids == t.point_prefix + tuple(tok.encode(" dog")) + (3,)


def test_spatial_refs_become_placeholders_with_values(tiny):
    p = spatial_prompt([[0.25, 0.75], [0.125, 0.25, 0.625, 0.875]], tiny.cfg.tokenizer)
    assert p == Prompt((5, 5, 5, 5, 6), (0.25, 0.75, 0.375, 0.5625), ((0.5, 0.625),))
    full = _prompt(tiny, "query", question="this?", spatial_refs=[[0.5, 0.5]])
    assert full.ids[3:5] == (5, 5) and full.coords == (0.5, 0.5)


@pytest.mark.parametrize(
    "refs",
    [[[0.5]], [[0.1, 0.2, 0.3]], [[1.5, 0.2]], [[0.5, 0.5, 0.1, 0.9]], "x", [["a", 0.1]], [[float("nan"), 0.1]], [[True, 0.1]]],
)
def test_bad_spatial_refs(refs, tiny):
    with pytest.raises(SettingsError):
        spatial_prompt(refs, tiny.cfg.tokenizer)


def test_caption_lengths(tiny):
    assert _prompt(tiny, "caption", length="short").ids == tiny.cfg.tokenizer.caption["short"]
    with pytest.raises(SettingsError, match="length must be one of"):
        _prompt(tiny, "caption", length="medium")


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
    tok, cfg = tiny.tokenizer, tiny.cfg.tokenizer
    see, cat = tok.encode(" I see"), tok.encode(" a cat")
    ids = [*see, cfg.start_ground_points_id, *cat, cfg.coord_id, cfg.coord_id, cfg.end_ground_id, *tok.encode(" here")]
    at = len(see) + 1 + len(cat)  # the coord tokens
    out = reasoning_output(TextRun(ids, {at: 0.25, at + 1: 0.5}), tok)
    assert out["text"] == " I see a cat here"
    assert out["grounding"] == [{"start_idx": 6, "end_idx": 12, "points": [[0.25, 0.5]]}]
    assert out["text"][6:12] == " a cat"


def test_boxes_are_clipped_to_the_image_unless_raw_values_are_asked_for():
    o = RegionObject(0.05, 0.95, (0.2, 0.2))
    assert box(o) == pytest.approx({"x_min": 0.0, "y_min": 0.85, "x_max": 0.15, "y_max": 1.0})
    assert box(o, clip=False) == pytest.approx({"x_min": -0.05, "y_min": 0.85, "x_max": 0.15, "y_max": 1.05})


def test_requests_name_their_skill_and_are_checked_by_it():
    assert list(REGISTRY) == ["caption", "query", "detect", "point", "segment"]
    assert SkillRequest("detect", object="x").skill is get("detect")
    with pytest.raises(SettingsError, match="unknown skill 'segmentation'"):
        SkillRequest("segmentation")
    image = object()
    body = {"object": "cat", "image_url": "x", "temperature": 0.1, "settings": {"temperature": 0.2}}
    req = parse_request(body, lambda v: image, "point")
    assert req.image is image and req.object == "cat" and req.settings_dict == {"temperature": 0.2}  # nested settings win
    for body, message in [
        ({"object": "cat"}, "detect needs an image"),
        ({"object": "cat", "image_url": "x", "spatial_refs": [[0.5, 0.5]]}, "detect takes no spatial_refs"),
        ({"object": 3, "image_url": "x"}, "object must be a str"),
        ({"object": "cat", "image_url": 7}, "image_url must be"),
        ({"object": "cat", "image_url": "x", "settings": []}, "settings must be an object"),
    ]:
        with pytest.raises(SettingsError, match=message):
            parse_request(body, lambda v: image, "detect")


def test_no_module_outside_skills_compares_skill_names():
    """Adding a skill is one module plus one registry line: nothing else dispatches on skill names."""
    import re
    from pathlib import Path

    import moonbase

    names = "|".join(REGISTRY)
    compare = re.compile(rf"""(==|!=|\bin)\s*[(\[{{]?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    root = Path(moonbase.__file__).parent
    offenders = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in root.rglob("*.py")
        if "skills" not in path.relative_to(root).parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if compare.search(line) and not line.lstrip().startswith("for ")  # iterating over names is not dispatching
    ]
    assert offenders == []
