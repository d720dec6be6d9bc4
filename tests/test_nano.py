"""The nano recipe (on the tiny config, to stay fast), the eval suite, and floors for the shipped model from its model card."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moonbase import VL
from moonbase.eval.synthetic import evaluate
from moonbase.hub import ASSETS, load_dir, nano
from moonbase.skills import REGISTRY
from moonbase.train.nano import TrainArgs, build_tokenizer, train


def _weights(path):
    return load_file(str(path / "model" / "model.safetensors"))


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    common = dict(model="tiny", steps=4, batch_images=2, warmup=2, checkpoint_every=100, seed=3, locate_tasks=2, drills=0)
    common |= dict(vision_steps=2, vision_batch=2)  # the stop falls in the vision phase, the resume crosses into the main one
    train(TrainArgs(out=str(tmp_path / "a"), **common))
    train(TrainArgs(out=str(tmp_path / "b"), max_minutes=1e-9, **common))  # stops (and saves) after one step
    assert len((tmp_path / "b" / "train_log.jsonl").read_text().splitlines()) == 1
    train(TrainArgs(out=str(tmp_path / "b"), resume=True, **common))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert "token" not in log[1] and "token" in log[2]  # two vision steps train only through the probe


def test_tiny_smoke_run_fits_the_default_tasks_per_scene(tmp_path):
    # byte-level ids make full scenes (8 shapes, eight locate tasks, drills) long: one row in ten passes 512 tokens,
    # the first of them at index 18 of this stream
    args = TrainArgs(out=str(tmp_path), model="tiny", steps=1, batch_images=24, vision_steps=0, curriculum=0, warmup=1)
    assert (train(args) / "model.safetensors").is_file()


def test_nano_tokenizer_layout():
    tok = build_tokenizer(n_examples=50)
    assert [tok.id_to_token(i) for i in (0, 3, 5, 10)] == [
        "<|endoftext|>",
        "<|md_reserved_2|>",
        "<|md_reserved_4|>",
        "<|caption|>",
    ]
    assert len(tok.encode("4821").ids) == 4  # digits stay single tokens


def test_eval_suite_reports_every_metric(tiny):
    result = evaluate(VL(tiny), seed=5, n_scenes=3, n_captcha=2, n_text=2, progress=False, max_tokens=8, max_objects=3)
    for key in ("detect_f1", "point_accuracy", "count_accuracy", "qa_accuracy", "caption_f1", "captcha_accuracy"):
        assert result[key] is None or 0.0 <= result[key] <= 1.0, key
    assert result["n_examples"]["images"] == 7 and result["seconds"] >= 0


@pytest.mark.skipif(not (ASSETS / "nano" / "model.safetensors").is_file(), reason="nano weights not built into this checkout")
def test_shipped_nano_scores_near_its_model_card():
    # Floors: the model card's means over suite seeds 1/2/3 (detect 0.952, point 0.937, count 0.902, qa 0.967, caption
    # 0.858, segment mIoU 0.784) less three standard errors of a 60-scene suite (bootstrap over the scenes of seed 1's
    # full suite, measured for the previous nano: detect 0.022, point 0.021, count 0.044, qa 0.027, caption 0.018;
    # segment mIoU about 0.026). This call (greedy, so deterministic) scored detect 0.957, point 0.954, count 0.950,
    # qa 0.950, caption 0.841, segment mIoU 0.813 (17 s on 2 CPU cores).
    result = evaluate(VL(nano()), seed=2024, n_scenes=60, n_captcha=4, n_text=4, progress=False)
    assert result["n_examples"]["count"] == result["n_examples"]["qa"] == 60
    assert result["detect_f1"] >= 0.88
    assert result["point_accuracy"] >= 0.87
    assert result["count_accuracy"] >= 0.77
    assert result["qa_accuracy"] >= 0.88
    assert result["caption_f1"] >= 0.80
    assert result["segment_miou"] >= 0.70


def test_a_segment_recipe_tokenizer_writes_path_numbers_in_one_token(tmp_path):
    from moonbase.tokenizer import Tokenizer
    from moonbase.train.batch import render_task
    from moonbase.train.nano import nano_config

    tok = build_tokenizer(n_examples=50, segment=True)
    assert all(len(tok.encode(f" {v}").ids) == 1 for v in range(0, 961, 30))
    assert len(tok.encode("4821").ids) == 4  # digits in ordinary text stay single tokens
    cfg = nano_config(tok)
    assert cfg.tokenizer.segment_prefix == (1, tok.token_to_id("<|segment|>"), 2)
    # a scene's outline task is taught with its numbers snapped to the tokenizer's (multiples of 30)
    from moonbase.data.mix import synthetic_example

    task = next(
        t for i in range(20) for t in synthetic_example("train", 0, i, "shapes", segment_tasks=1).tasks if t.skill == "segment"
    )
    seg = render_task(task, Tokenizer(tok, cfg.tokenizer), cfg)
    numbers = [tok.id_to_token(i) for i in seg.ids if tok.id_to_token(i).lstrip("Ġ ").isdigit()]
    assert numbers and all(int(n.lstrip("Ġ ")) % 30 == 0 for n in numbers)


def test_tiny_smoke_run_with_segment_tasks(tmp_path):
    args = TrainArgs(
        out=str(tmp_path), model="tiny", steps=1, batch_images=4, vision_steps=0, curriculum=0, warmup=1, segment_tasks=1
    )
    m = load_dir(train(args))
    assert m.cfg.tokenizer.segment_prefix and "segment" in [n for n, k in REGISTRY.items() if k.supports(m.cfg)]


def _client_segment_iou(model: str, tmp_path) -> list[float]:
    """`moonbase serve --model MODEL` in its own process; the official client segments one shape of the demo's
    sample scene (not streamed, then streamed); the mask IoU of each returned path against the true outline."""
    import moondream as md

    from moonbase.data.shapes import outline_in, render_scene
    from moonbase.metrics import mask_iou, path_mask

    from .serving import serve_processes

    scene = render_scene(seed=7, n_objects=4, size=(384, 384))  # the README's first command renders this scene
    shape = next(s for s in scene.shapes if s.kind == "circle")
    true = path_mask(outline_in(shape.kind, shape.box), *scene.image.size)
    with serve_processes([[]], tmp_path, 24040, model=model) as (url,):
        client = md.vl(endpoint=url + "/v1")
        whole = client.segment(scene.image, shape.label)
        items = list(client.segment(scene.image, shape.label, stream=True))
    assert items[0] == {"bbox": whole["bbox"]} and items[-1] == {"path": whole["path"], "bbox": whole["bbox"], "completed": True}
    assert "".join(i["chunk"] for i in items if "chunk" in i) == whole["path"]
    return [mask_iou(path_mask(r["path"], *scene.image.size), true) for r in (whole, items[-1])]


@pytest.mark.skipif(not (ASSETS / "nano" / "model.safetensors").is_file(), reason="nano weights not built into this checkout")
def test_the_official_client_segments_a_shape_with_nano(tmp_path):
    assert min(_client_segment_iou("nano", tmp_path)) >= 0.7
