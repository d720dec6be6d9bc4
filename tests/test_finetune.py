"""Fine-tuning on the tiny random model: SFT learns, the GRPO loss is the hand-computed number, rollouts
sampled by the engine are replayed with exactly their log-probabilities, adapters export and import."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from moonbase import simple
from moonbase.api import VL
from moonbase.data.shapes import render_scene
from moonbase.engine.engine import Engine, EngineConfig
from moonbase.errors import CheckpointError, TuningError
from moonbase.finetune.data import from_iterable, load_jsonl
from moonbase.finetune.lora import LoraConfig, TrainableLora, export_peft, import_peft
from moonbase.finetune.rl import RLConfig, action_logprobs, grpo_loss, rl_batch, rl_loss
from moonbase.finetune.rollouts import sample_rollouts
from moonbase.finetune.trainer import Trainer, adapter_from_checkpoint
from moonbase.finetune.types import RLGroup, SFTGroup, parse_rollout, parse_target
from moonbase.metrics import assignment, detect_reward, point_reward
from moonbase.model.lora import LoraBatch, adapter_from_state_dict
from moonbase.model.text import decoder
from moonbase.skills import SkillRequest, get
from moonbase.skills.program import TextRun
from moonbase.skills.query import reasoning_output, trace_tokens
from moonbase.skills.training import Rollout, Target
from moonbase.train.batch import transcript


@pytest.fixture(scope="module")
def image():
    return np.asarray(render_scene(5, max_objects=3).image)


def _perturbed(trainer: Trainer, seed: int = 0) -> Trainer:
    """Give the adapter (and a trained region head) non-trivial weights, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.lora.b.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for p in trainer.params[len(list(trainer.lora.parameters())) :]:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return trainer


@pytest.mark.parametrize("moondream3", [False, True], ids=["md2", "md3"])
def test_sft_loss_falls_on_a_tiny_overfit_set(image, moondream3):
    from moonbase.hub import tiny_random

    m = tiny_random(seed=3, moondream3=moondream3)
    trainer = Trainer(m, LoraConfig(rank=8, train_region=True))
    groups = [
        SFTGroup(SkillRequest("query", image, question="What is it?"), Target("a red star")),
        SFTGroup(SkillRequest("detect", image, object="circle"), Target(boxes=((0.1, 0.2, 0.3, 0.4), (0.6, 0.5, 0.9, 0.8)))),
        SFTGroup(SkillRequest("point", image, object="star"), Target(points=((0.7, 0.2),))),
    ]
    losses = [trainer.train_step(groups, lr=5e-3)["sft_loss"] for _ in range(30)]
    assert trainer.step == 30
    assert losses[-1] < 0.6 * losses[0]


def test_grpo_loss_on_a_toy_batch_is_the_hand_computed_value():
    # Two groups. Group 0: rewards (1, 0) -> advantages (+1, -1) (mean 0.5, population std 0.5); its
    # rollout 0 has actions a0, a1, its rollout 1 has a2. Group 1: one action a3, advantage 2.
    logp = torch.tensor([-1.0, -2.0, -0.5, -1.0], requires_grad=True)
    old = torch.tensor([-1.2, -2.0, -0.1, float("nan")])  # a3 has no recorded old log-probability
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0])
    group = torch.tensor([0, 0, 0, 1])
    loss, stats = grpo_loss(logp, old, adv, group, RLConfig(clip_low=0.2, clip_high=0.2))
    # a0: ratio e^0.2 = 1.2214 > 1.2 with A > 0 -> min(1.2214, 1.2) = 1.2 -> -1.2
    # a1: ratio 1 -> -1
    # a2: ratio e^-0.4 = 0.67032, A < 0: min(-0.67032, -0.8) = -0.8 -> +0.8
    # group 0 mean: (-1.2 - 1 + 0.8) / 3 = -0.466667; group 1: ratio 1 (old = new) -> -2
    # loss = (-0.466667 - 2) / 2 = -1.233333
    assert float(loss.detach()) == pytest.approx(-1.2333333, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(0.5)
    loss.backward()
    # only unclipped actions pass gradient: a1: -A / (3 * 2) = -1/6; a3: -2 / 2 = -1 (times ratio 1)
    assert logp.grad.tolist() == pytest.approx([0.0, -1 / 6, 0.0, -1.0], abs=1e-6)
    with_kl, _ = grpo_loss(logp.detach(), old, adv, group, RLConfig(kl_coef=0.5), logp_ref=torch.tensor([-1.0, -1.0, -1.0, -1.0]))
    d = torch.tensor([0.0, 1.0, -0.5, 0.0])
    k3 = torch.exp(d) - d - 1  # per action
    assert float(with_kl) == pytest.approx(-1.2333333 + 0.5 * float((k3[:3].mean() + k3[3]) / 2), abs=1e-6)


def test_rl_loss_through_the_model_is_the_token_level_group_mean(tiny, image):
    trainer = _perturbed(Trainer(tiny, LoraConfig(rank=4)))
    req = SkillRequest("point", image, object="circle")
    two = Rollout(coords=(10, 20, 30, 40), finish_reason="stop")  # 2 objects: 3 actions each + stop
    none = Rollout(finish_reason="stop")  # stops at once: 1 action
    group = RLGroup(req, (two, none), (1.0, 0.0))
    adapter = trainer.adapter("t", frozen=False)
    loss, stats = rl_loss(trainer.policy, [group], adapter, RLConfig(), 10**7)
    a = 0.5 / (0.5 + 1e-6)  # advantage of the better rollout; the other gets -a
    assert stats["actions"] == 8
    assert float(loss.detach()) == pytest.approx(-(7 * a - a) / 8, abs=1e-6)  # no logprobs recorded: ratio 1


@pytest.mark.parametrize("which", ["tiny", "tiny3"])
def test_engine_rollouts_are_replayed_with_exactly_their_logprobs(which, image, request):
    tiny = request.getfixturevalue(which)  # tiny3: Moondream 3, per-expert adapters through the grouped path
    trainer = _perturbed(Trainer(tiny, LoraConfig(rank=4, train_region=True, train_vision=True)))
    vl = VL(tiny, engine=Engine(tiny, EngineConfig(kv_memory_mb=16), background=False))
    live = trainer.adapter("live")
    for skill, kw in [
        ("query", {"question": "Why?", "reasoning": True}),
        ("point", {"object": "o"}),
        ("detect", {"object": "o"}),
        *([("segment", {"object": "o"})] if tiny.cfg.tokenizer.segment_prefix else []),
    ]:
        req = SkillRequest(skill, image, settings=(("max_objects", 4), ("max_tokens", 8), ("seed", 1)), **kw)
        rollouts = sample_rollouts(vl, req, 4, live, 0)
        parsed = tuple(parse_rollout(req.skill, r, tiny.cfg) for r in rollouts)
        assert sum(len(r.logprobs) for r in parsed) > 4
        rb = rl_batch([RLGroup(req, parsed, (0.0, 1.0, 0.5, 1.0))], tiny, RLConfig(), 10**7)
        with torch.no_grad():
            logp = action_logprobs(trainer.policy, rb, trainer.adapter("x"))
        torch.testing.assert_close(logp, rb.logp_old, atol=1e-5, rtol=0)
    greedy = sample_rollouts(vl, SkillRequest("point", image, object="o", settings=(("temperature", 0.0),)), 1, None, 0)[0]
    m = tiny  # a greedy rollout of the base model points where `moonbase.simple` does
    enc = VL(m).encode_image(image)
    want = [{"x": o.x, "y": o.y} for o in simple.run(m, enc, SkillRequest("point", object="o")).objects]
    assert greedy["output"]["points"][: len(want)] == want[: len(greedy["output"]["points"])]


def test_checkpoints_export_in_the_variant_layout_with_the_scale_folded(tiny, tmp_path):
    trainer = _perturbed(Trainer(tiny, LoraConfig(rank=8, alpha=32.0, targets=("qkv", "fc1", "fc2"))))
    x = torch.randn(2, 5, tiny.cfg.text.dim, generator=torch.Generator().manual_seed(0))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()

    def run(adapter):
        return decoder(
            x, tiny.w.text, tiny.cfg.text, tiny.rope, torch.arange(5), causal, lora=LoraBatch.single(adapter, 2, x.device)
        )

    want = run(trainer.adapter("live"))
    state = trainer.checkpoint()
    loaded = adapter_from_state_dict("ckpt", state["lora_state_dict"], tiny.cfg.text)
    b_raw = trainer.lora.b["0_qkv"].detach()
    torch.testing.assert_close(loaded.layers[0]["qkv"][1], b_raw * 4.0)  # alpha / rank = 4, folded into B
    torch.testing.assert_close(run(loaded), want)
    torch.testing.assert_close(run(adapter_from_checkpoint("c", state, tiny)), want)
    with_region = _perturbed(Trainer(tiny, LoraConfig(rank=8, train_region=True)))
    served = adapter_from_checkpoint("r", with_region.checkpoint(), tiny)
    own = with_region.own["region"].coord_decoder["fc1"].weight
    assert torch.equal(served.region.coord_decoder["fc1"].weight, own)
    assert not torch.equal(own, tiny.w.region.coord_decoder["fc1"].weight) and served.vision is None
    peft_state, cfg = import_peft(export_peft(state["lora_state_dict"], trainer.cfg, tmp_path / "peft", "tiny"))
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 32.0 and config["target_modules"] == ["fc1", "fc2", "qkv"]
    torch.testing.assert_close(run(adapter_from_state_dict("p", peft_state, tiny.cfg.text)), want)
    fresh = TrainableLora(tiny.cfg.text, cfg)
    fresh.load_variant_state(peft_state)
    torch.testing.assert_close(run(fresh.adapter("f")), want)
    config["target_modules"] += ["proj"]
    del config["moonbase_proj_input"]
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    tensors["base_model.model.text.blocks.0.attn.proj.lora_A.weight"] = torch.zeros(8, tiny.cfg.text.dim)
    tensors["base_model.model.text.blocks.0.attn.proj.lora_B.weight"] = torch.zeros(tiny.cfg.text.dim, 8)
    save_file(tensors, str(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="attention output"):
        import_peft(tmp_path / "peft")


def test_reasoning_targets_round_trip_through_the_inference_parser(tiny, image):
    request = SkillRequest("query", image, question="How many?")
    target = parse_target(
        request,
        {
            "answer": "2",
            "reasoning": {
                "text": "I see a star and a circle.",
                "grounding": [{"start_idx": 8, "end_idx": 14, "points": [[0.25, 0.5]]}],
            },
        },
    )
    run = TextRun()
    for i, (t, coord) in enumerate(trace_tokens(target, tiny.tokenizer)):
        run.ids.append(t)
        if coord is not None:
            run.coords[i] = coord
    out = reasoning_output(run, tiny.tokenizer)
    assert out == {"text": "I see a star and a circle.", "grounding": [{"start_idx": 8, "end_idx": 14, "points": [[0.25, 0.5]]}]}
    seg = transcript(*request.skill.teach(request, target, tiny.tokenizer, tiny.cfg), tiny.cfg.tokenizer)
    labels = [t for t in seg.token_label if t != -100]
    assert labels[-2:] == tiny.tokenizer.encode("2") + [tiny.cfg.tokenizer.eos_id]
    assert tiny.cfg.tokenizer.answer_id in labels and sum(c != -100 for c in seg.coord_label) == 2


def test_data_files_load_with_paths_relative_to_the_file_and_errors_name_the_line(tmp_path, image):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.fromarray(image).save(tmp_path / "img" / "a.png")
    rows = [
        {"image": "img/a.png", "question": "What?", "answer": "a star"},
        {"image": "img/a.png", "object": "star", "boxes": [[0.1, 0.1, 0.2, 0.3]]},
        {"image": "img/a.png", "object": "star", "points": [{"x": 0.5, "y": 0.5}]},
        {"image": "img/a.png", "object": "star", "boxes": [[0, 0, 1, 1]], "points": [], "skill": "point"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    examples = load_jsonl(path)
    assert [e.request.skill.name for e in examples] == ["query", "detect", "point", "point"]
    assert examples[0].request.image == tmp_path / "img" / "a.png" and examples[1].where == f"{path}:2"
    assert from_iterable([{"image": image, "question": "q", "answer": "a"}])[0].request.image is image
    bad = [
        ('{"image": "img/a.png", "question": "q"}', "answer must be a string"),
        ('{"image": "img/missing.png", "question": "q", "answer": "a"}', "no such image"),
        ('{"image": "img/a.png", "object": "o", "boxes": [[0.5, 0.5, 0.1, 0.1]]}', "x_min <= x_max"),
        ('{"image": "img/a.png"}', "cannot tell the skill"),
        ("{not json", "not JSON"),
    ]
    for line, message in bad:
        path.write_text(json.dumps(rows[0]) + "\n" + line + "\n")
        with pytest.raises(TuningError, match=f"data.jsonl:2: .*{message}"):
            load_jsonl(path)


def test_rewards_match_their_definitions():
    rng = np.random.default_rng(0)
    for shape in [(3, 3), (2, 4), (4, 2), (1, 1)]:
        w = rng.random(shape).tolist()
        best = max(
            sum(w[i][j] for i, j in zip(rows, cols, strict=False))
            for rows in itertools.permutations(range(shape[0]))
            for cols in itertools.permutations(range(shape[1]))
        )
        assert sum(w[i][j] for i, j in assignment(w)) == pytest.approx(best)
    box = (0.1, 0.1, 0.3, 0.3)
    assert detect_reward([], []) == 1.0 and detect_reward([box], []) == 0.0
    assert detect_reward([box], [box]) == pytest.approx(1.0)
    half = (0.1, 0.1, 0.2, 0.3)  # IoU 0.5 with box
    assert detect_reward([half, (0.7, 0.7, 0.8, 0.8)], [box]) == pytest.approx((2 / 3 + 0.5 / 2) / 2)
    assert point_reward([(0.2, 0.2), (0.9, 0.9)], [box]) == pytest.approx(2 / 3)
    assert point_reward([(0.52, 0.5)], [], [(0.5, 0.5)]) == 1.0 and point_reward([(0.6, 0.5)], [], [(0.5, 0.5)]) == 0.0
    assert math.isclose(point_reward([], [box]), 0.0)


def test_rollouts_sent_back_edited_are_refused(tiny):
    ok = {"skill": "detect", "coords": [1, 2], "sizes": [[3, 4]], "logprobs": [-1.0, -1.0, -1.0, -1.0, -1.0]}
    assert parse_rollout(get("detect"), ok, tiny.cfg).sizes == ((3, 4),)
    for edit, message in [
        ({"coords": [1]}, "2 coords per object"),
        ({"coords": [1, 10**6]}, "out of range"),
        ({"sizes": []}, "size each"),
        ({"logprobs": [0.5]}, r"\[None, 0\]"),
        ({"skill": "point"}, "does not match"),
    ]:
        with pytest.raises(TuningError, match=message):
            parse_rollout(get("detect"), ok | edit, tiny.cfg)
    with pytest.raises(TuningError, match="token ids"):
        parse_rollout(get("query"), {"answer_tokens": [tiny.cfg.text.vocab_size]}, tiny.cfg)


def test_the_walkthrough_jsonl_and_coco_annotations_load(tmp_path, image):
    from PIL import Image

    from moonbase.finetune.data import load_coco

    Image.fromarray(image).save(tmp_path / "a.png")
    rows = [{"image_path": "a.png", "prompt": "What is it?", "response": "a star"}]
    (tmp_path / "walk.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0] | {"image": "a.png"}) + "\n")
    with pytest.raises(TuningError, match="walk.jsonl:2: give image or image_path, not both"):
        load_jsonl(tmp_path / "walk.jsonl")
    (tmp_path / "walk.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (example,) = load_jsonl(tmp_path / "walk.jsonl")
    assert example.request.skill.name == "query" and example.request.question == "What is it?"
    assert example.target.answer == "a star" and example.row == rows[0]  # a reward function sees the row as given
    h, w = image.shape[:2]
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "width": w, "height": h}],
        "categories": [{"id": 1, "name": "star"}, {"id": 2, "name": "moon"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, w / 2, h / 4], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [w / 2, h / 2, w / 4, h / 4], "iscrowd": 0},
            {"id": 3, "image_id": 7, "category_id": 2, "bbox": [0, 0, w, h], "iscrowd": 1},  # crowd: left out
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    (example,) = load_coco(tmp_path / "instances.json", tmp_path)
    assert example.request.skill.name == "detect" and example.request.object == "star"
    assert example.target.boxes == ((0.0, 0.0, 0.5, 0.25), (0.5, 0.5, 0.75, 0.75))
    coco["annotations"][0]["image_id"] = 8
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    with pytest.raises(TuningError, match="annotations\\[0\\] names an image or category"):
        load_coco(tmp_path / "instances.json", tmp_path)


def test_full_fine_tuning_of_nano_on_the_walkthrough_jsonl_saves_a_model_that_answers_as_taught(tmp_path, capsys):
    from moonbase.cli import main
    from moonbase.data.shapes import render_scene

    rows = []
    for i in range(4):
        render_scene(300 + i).image.save(tmp_path / f"{i}.png")
        rows.append({"image_path": f"{i}.png", "prompt": "What is the secret word?", "response": "zebra"})
    (tmp_path / "walk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ask = ["query", str(tmp_path / "0.png"), "What is the secret word?", "--temperature", "0", "--max-tokens", "8"]
    assert main([*ask, "--model", "nano"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] != "zebra"
    run = tmp_path / "run"
    argv = ["finetune", "sft", str(tmp_path / "walk.jsonl"), "--full", "--out", str(run), "--model", "nano"]
    assert (
        main(argv + ["--steps", "24", "--batch", "2", "--grad-accum", "2", "--lr", "1e-3", "--store", str(tmp_path / "s")]) == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["model"] == str(run / "model")
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 24 and log[-1]["loss"] < 0.25 * log[0]["loss"]  # it overfits the tiny set
    assert {p.name for p in (run / "model").iterdir()} >= {"model.safetensors", "config.json", "tokenizer.json"}
    assert main([*ask, "--model", str(run / "model")]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == "zebra"  # loaded as any model directory
    assert (
        main(argv + ["--steps", "24", "--batch", "2", "--grad-accum", "2", "--lr", "1e-3", "--store", str(tmp_path / "s")]) == 0
    )
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 24  # a rerun finds the run finished (resumes)


def test_region_only_fine_tuning_trains_only_the_region_head(tmp_path, image):
    from moonbase.finetune.data import from_iterable
    from moonbase.finetune.full import FullConfig, Scope, fine_tune_full
    from moonbase.hub import load_dir, nano

    base = nano()
    rows = [{"image": image, "object": "star", "boxes": [[0.1, 0.1, 0.4, 0.5]]}] * 4
    out = fine_tune_full(
        base, from_iterable(rows), tmp_path, FullConfig(Scope.REGION_ONLY, steps=3, batch=2, lr=1e-3, progress=False)
    )
    tuned = load_dir(out)
    changed = {n.split(".")[0] for n, p in tuned.w.named_parameters() if not torch.equal(p, dict(base.w.named_parameters())[n])}
    assert changed == {"region"}
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert all(r["loss"] == pytest.approx(r["coord"] + r["size"], abs=1e-3) for r in log)  # no token loss
    with pytest.raises(TuningError, match="detect, point or segment"):
        fine_tune_full(
            base, from_iterable([{"image": image, "question": "q", "answer": "a"}]), tmp_path / "q", FullConfig(Scope.REGION_ONLY)
        )


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny, image):
    from moonbase.finetune.data import from_iterable
    from moonbase.finetune.full import FullConfig, _losses

    examples = from_iterable([{"image": image, "question": "What is it?", "answer": "a star"}] * 2)
    tiny.w.requires_grad_(True)
    try:
        grads = []
        for recompute in (False, True):
            tiny.w.zero_grad(set_to_none=True)
            loss = _losses(tiny, examples, FullConfig(gradient_checkpointing=recompute))["loss"]
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in tiny.w.text.parameters() if p.grad is not None]))
    finally:
        tiny.w.requires_grad_(False)
        tiny.w.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and len(g0) == len(g1) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1, strict=True))
