"""Every skill end to end on a tiny random model, through the public API."""

import numpy as np
import pytest

from moonbase import VL, EncodedImage, ImageError, SettingsError
from moonbase.data.shapes import render_scene
from moonbase.errors import AdapterNotFoundError

GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def vl(tiny):
    return VL(tiny)


@pytest.fixture(scope="module")
def image():
    return render_scene(seed=3, n_objects=3, size=(160, 120)).image


def test_every_skill_gives_the_single_request_answers_in_client_shapes(vl, image):
    """Through the public API (settings, engine, decoding, output shapes), greedy answers are exactly what the
    plain loops of `moonbase.simple` give on the same inputs."""
    from moonbase import simple
    from moonbase.skills import SkillRequest
    from moonbase.skills.query import reasoning_output

    m, enc = vl.model, vl.encode_image(image)

    def reference(skill: str, image=enc, settings=GREEDY, **args):
        return simple.run(m, image, SkillRequest(skill, settings=settings, **args))

    def text(ids: list[int]) -> str:
        assert 0 < len(ids) <= GREEDY["max_tokens"]  # non-empty; the tiny model rarely stops, so max_tokens binds
        return m.tokenizer.decode(ids)

    assert vl.caption(image, "short", settings=GREEDY) == {"caption": text(reference("caption", length="short").text.ids)}
    for question, refs in (("How many?", None), ("What is this?", [[0.5, 0.5], [0.1, 0.1, 0.4, 0.6]])):
        want = text(reference("query", question=question, spatial_refs=refs).text.ids)
        assert vl.query(image, question, spatial_refs=refs, settings=GREEDY) == {"answer": want}
    text_only = reference("query", None, question="Hello?").text.ids
    assert vl.query(None, "Hello?", settings=GREEDY) == {"answer": text(text_only)}
    out = reference("query", question="Where?", reasoning=True)
    reasoning = reasoning_output(out.trace, m.tokenizer)
    answer = text(out.text.ids)
    assert out.trace.ids
    assert vl.query(image, "Where?", reasoning=True, settings=GREEDY) == {"reasoning": reasoning, "answer": answer}

    want = reference("detect", object="circle", settings={"max_objects": 4}).objects
    objects = vl.detect(image, "circle", settings={"max_objects": 4})["objects"]
    assert 0 < len(objects) == len(want) <= 4 and all(set(o) == {"x_min", "y_min", "x_max", "y_max"} for o in objects)
    for o, w in zip(objects, want, strict=True):  # boxes are centre +- size / 2, clipped to the image
        corners = [w.x - w.size[0] / 2, w.y - w.size[1] / 2, w.x + w.size[0] / 2, w.y + w.size[1] / 2]
        assert [o["x_min"], o["y_min"], o["x_max"], o["y_max"]] == pytest.approx([min(1, max(0, c)) for c in corners])
        assert 0 <= w.x < 1 and 0 <= w.y < 1 and 0 < w.size[0] <= 1 and 0 < w.size[1] <= 1  # coordinate and size bins
    want = reference("point", object="circle", settings={"max_objects": 3}).objects
    points = vl.point(image, "circle", settings={"max_objects": 3})["points"]
    assert 0 < len(points) <= 3 and points == [{"x": w.x, "y": w.y} for w in want]
    assert all(0 <= p["x"] < 1 and 0 <= p["y"] < 1 for p in points)
    gaze = vl.detect_gaze(image, (0.3, 0.4))["gaze"]
    assert gaze is None or set(gaze) == {"x", "y"}


def test_stream_concatenates_to_the_full_text(vl, image):
    full = vl.caption(image, settings=GREEDY)["caption"]
    pieces = list(vl.caption(image, stream=True, settings=GREEDY)["caption"])
    assert "".join(pieces) == full


def test_encoded_image_is_reusable_and_equivalent(vl, image):
    enc = vl.encode_image(image)
    assert isinstance(enc, EncodedImage) and enc.length == vl.model.cfg.prefix_len
    assert vl.query(enc, "What?", settings=GREEDY) == vl.query(image, "What?", settings=GREEDY)
    assert vl.detect(enc, "star") == vl.detect(image, "star")
    assert vl.query(enc, "What?", settings=GREEDY) == vl.query(enc, "What?", settings=GREEDY)


def test_max_tokens_and_seeded_sampling(vl, image):
    from moonbase import simple
    from moonbase.skills import SkillRequest
    from moonbase.skills.program import StopReason

    enc = vl.encode_image(image)
    run = simple.run(vl.model, enc, SkillRequest("caption", settings={"temperature": 0, "max_tokens": 5})).text
    assert len(run.ids) == 5 or run.stop_reason is StopReason.STOP
    stats = {}
    answer = vl.caption(enc, settings={"temperature": 0, "max_tokens": 5}, stats=stats)
    assert answer == {"caption": vl.model.tokenizer.decode(run.ids)}
    assert stats["stop_reason"] == run.stop_reason.value and stats["output_tokens"] >= len(run.ids)
    hot = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "seed": 7}
    assert vl.caption(enc, settings=hot) == vl.caption(enc, settings=hot)
    assert vl.caption(enc, settings={**hot, "seed": 8}) != vl.caption(enc, settings=hot)


def test_bad_arguments_raise_typed_errors(vl, image):
    with pytest.raises(SettingsError):
        vl.caption(image, "huge")
    with pytest.raises(SettingsError):
        vl.query(image, None)
    with pytest.raises(SettingsError):
        vl.query(None, "where?", spatial_refs=[[0.5, 0.5]])
    with pytest.raises(SettingsError):
        vl.detect(image, "")
    with pytest.raises(SettingsError):
        vl.point(image, "x", settings={"max_objects": 0})
    with pytest.raises(AdapterNotFoundError, match="abc"):
        vl.caption(image, settings={"variant": "abc"})
    with pytest.raises(ImageError):
        vl.caption(b"not an image")
    with pytest.raises(ImageError):
        vl.detect(np.zeros((0, 5, 3), np.uint8), "x")


def test_context_overflow_is_a_clear_error(vl, image):
    with pytest.raises(SettingsError, match="does not fit the context"):
        vl.query(image, "word " * 2000, settings=GREEDY)


def test_cli_models_and_pull_errors(capsys, monkeypatch):
    from moonbase import cli, hub
    from moonbase.errors import ModelNotFoundError

    assert cli.main(["models"]) == 0
    assert "nano" in capsys.readouterr().out

    def offline(repo, revision=None):
        raise ModelNotFoundError(f"cannot get {repo!r} from the Hugging Face hub: offline")

    monkeypatch.setattr(hub, "hub_snapshot", offline)
    assert cli.main(["pull", "vikhyatk/moondream2"]) == 2
    assert "cannot get 'vikhyatk/moondream2'" in capsys.readouterr().err


def test_engine_knobs_of_vl_take_effect_and_are_validated(image):
    import moonbase
    from moonbase.errors import ConfigError
    from moonbase.skills import SkillRequest

    vl = moonbase.vl("tiny-random", kv_memory_mb=2, prefix_cache_mb=0.5, max_batch=3, max_crops=1, pipeline=False)
    cfg = vl.engine.effective_config
    assert (cfg["max_batch"], cfg["pipeline"]) == (3, False) and 1.9 < cfg["kv_memory_mb"] <= 2
    big = np.zeros((1000, 1000, 3), np.uint8)
    assert moonbase.vl("tiny-random").prepare(SkillRequest("caption", big)).image.tiling == (2, 2)  # the model's own
    assert vl.prepare(SkillRequest("caption", big)).image.tiling == (1, 1)
    for bad in ({"max_batch": 0}, {"kv_memory_mb": -1}, {"max_crops": 0}, {"max_step_tokens": 2.5}):
        with pytest.raises(ConfigError):
            moonbase.vl("tiny-random", **bad)


def test_importing_moonbase_loads_no_torch_engine_hub_or_server():
    import subprocess
    import sys

    heavy = ["torch", "moonbase.engine.engine", "moonbase.hub", "moonbase.server.app", "moonbase.api"]
    code = f"import sys, moonbase, moonbase.data.shapes, moonbase.cli; print([m for m in {heavy!r} if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
