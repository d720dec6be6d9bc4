"""Moondream 3 on a tiny random config: the mixture-of-experts FFN against a per-token loop, routing that does
not depend on the batch around a token, every skill through the engine equal to the single-request path
(alone, in mixed batches with cache hits, under preemption), and the segment output."""

from __future__ import annotations

import base64
import io

import httpx
import moondream as md
import pytest
import torch
from PIL import Image

from moonbase.api import VL
from moonbase.engine.engine import Engine, EngineConfig
from moonbase.errors import SkillNotSupportedError
from moonbase.hub import save_dir
from moonbase.model import text
from moonbase.model.moe import expert_activation, grouped_experts, route
from moonbase.skills import SkillRequest
from moonbase.skills.program import Output, StopReason, TextRun
from moonbase.skills.segment import absolute_path, parse_path, svg_path

from .helpers import check_batch, outcome, reference, request, scenes, skill_cases
from .serving import serve_processes


@pytest.fixture(scope="module")
def images():
    return scenes(3, seed=5)


def per_token_moe(x, w, k):
    """The MoE written the plain way: each token, each of its k experts, one matmul at a time."""
    logits = x @ w.router.weight.T + w.router.bias
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top = logits[t].topk(k)
        weights = torch.softmax(top.values, dim=-1)
        for e, g in zip(top.indices.tolist(), weights, strict=True):
            out[t] += g * (expert_activation(w.fc1.weight[e] @ x[t]) @ w.fc2.weight[e].T)
    return out


@pytest.mark.parametrize("n_tokens", [1, 7, 40])
def test_grouped_experts_equal_a_per_token_loop(tiny3, n_tokens):
    w = tiny3.w.text.blocks[1]["mlp"]
    x = torch.randn(n_tokens, tiny3.cfg.text.dim, generator=torch.Generator().manual_seed(n_tokens))
    want = per_token_moe(x, w, 2)
    _, ids, weights = route(x, w, 2)
    torch.testing.assert_close(grouped_experts(x, ids, weights, w.fc1.weight, w.fc2.weight), want, rtol=1e-5, atol=1e-5)
    x_grad = x.clone().requires_grad_(True)  # training: the loop path, which autograd can go through
    got = grouped_experts(x_grad, ids, weights, w.fc1.weight, w.fc2.weight)
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    assert x_grad.grad is not None and x_grad.grad.abs().sum() > 0


def test_a_token_picks_the_same_experts_alone_and_in_a_batch(tiny3):
    m, cfg = tiny3, tiny3.cfg.text
    g = torch.Generator().manual_seed(0)
    row = torch.randn(1, 9, cfg.dim, generator=g)
    batch = torch.cat([torch.randn(1, 9, cfg.dim, generator=g), row, torch.randn(1, 9, cfg.dim, generator=g)])
    pos = torch.arange(9)
    alone, together = [], []
    text.decoder(row, m.w.text, cfg, m.rope, pos, None, routes=alone)
    text.decoder(batch, m.w.text, cfg, m.rope, pos, None, routes=together)
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a[0].topk(2).indices.sort().values, b[1].topk(2).indices.sort().values)


def test_every_skill_alone_matches_the_single_request_path(tiny3, images):
    engine = Engine(tiny3, EngineConfig(kv_memory_mb=8), background=False)
    vl = VL(tiny3, engine=engine)
    for case in skill_cases(images[:2], segment=True):
        want = reference(tiny3, images, *case)
        assert outcome(engine.submit(request(vl, images, *case)).result().output, case[2]) == want, case


def test_mixed_batch_with_cache_hits_matches(tiny3, images):
    engine = check_batch(tiny3, images, EngineConfig(max_batch=32, kv_memory_mb=8))
    assert engine.cache.hits > 0


def test_small_pool_preempts_without_changing_answers(tiny3, images):
    t = tiny3.cfg.text
    per_token_mb = 2 * t.n_layers * t.n_kv_heads * t.hd * 4 / 2**20
    tokens = 3 * tiny3.cfg.prefix_len + 60
    engine = check_batch(tiny3, images[:2], EngineConfig(max_batch=16, block_size=8, kv_memory_mb=tokens * per_token_mb))
    assert engine.scheduler.preemptions > 0


def test_query_prompt_and_defaults_follow_moondream3(tiny3, images):
    tok, question = tiny3.cfg.tokenizer, tuple(tiny3.tokenizer.encode("hi"))
    for reasoning, end in ((False, tok.answer_id), (True, tok.thinking_id)):
        req = SkillRequest.of("query", None, "hi", reasoning=reasoning)
        assert req.skill.prompt(req, tiny3.tokenizer).ids == (*tok.query_prefix, *question, end)  # no doubled 3
    result = VL(tiny3).query(images[0], "What is it?", settings={"max_tokens": 4})
    assert "reasoning" in result  # Moondream 3 reasons unless told not to
    assert "reasoning" not in VL(tiny3).query(images[0], "What is it?", reasoning=False, settings={"max_tokens": 4})


def test_segment_needs_a_model_that_segments(tiny, images):
    from moonbase.finetune.types import parse_group

    with pytest.raises(SkillNotSupportedError, match=f"model '{tiny.name}' cannot segment: it has no segmentation head"):
        VL(tiny).segment(images[0], "circle", stream=True)
    group = {"mode": "sft", "request": {"skill": "segment", "image": images[0], "object": "circle"}}
    group["target"] = {"path": "M 0 0 L 1 1 Z", "bbox": {"x_min": 0, "y_min": 0, "x_max": 1, "y_max": 1}}
    with pytest.raises(SkillNotSupportedError, match="groups.0: this model cannot segment"):
        parse_group(group, lambda x: x, tiny.cfg, "groups.0")  # fine-tuning refuses it before teaching anything


def test_svg_path_tokens_become_a_bbox_relative_path():
    assert svg_path(["M", "480", "-", "96", "L", "960", "0", "48", "Z"]) == ("M 0.5 -0.1 L 1 0 Z", None)
    assert svg_path(["M", "1", "2", "Z"]) == ("M 0.001 0.002 Z", None)
    assert svg_path(["ue", "M"]) == ("", "Unexpected SVG token 'ue'")
    assert svg_path(["M", "10", "20", "L", "5", "x", "7"]) == ("M 0.01 0.021 L", "Unexpected SVG token 'x'")  # keeps what parsed


def _segment_output(m, words, coords=(0.95, 0.5), size=(0.2, 0.1)):
    tok, tokenizer = m.cfg.tokenizer, m.tokenizer
    ids = [tokenizer.encode(t)[0] for t in words]
    run = TextRun([tok.coord_id, tok.coord_id, tok.size_id, *ids], dict(enumerate(coords)), {2: size}, StopReason.STOP)
    return Output(StopReason.STOP, text=run, subject="cat"), ids


def test_segment_result_is_the_clients_path_in_image_units(tiny3):
    bbox = {"x_min": 0.25, "y_min": 0.375, "x_max": 0.75, "y_max": 0.625}
    commands, _ = parse_path(["M", "0", "0", "L", "960", "0", "l", "480", "-", "480", "Z"])
    # absolute numbers go through the bbox, relative ones (l) are deltas scaled by its size
    assert absolute_path(commands, bbox) == "M 0.25 0.375 L 0.75 0.375 l 0.25 -0.125 Z"
    out, _ = _segment_output(tiny3, ["M", "0", "0", "L", "9", "6"], (0.5, 0.5), (0.5, 0.25))
    result = SkillRequest("segment").skill.render(out, tiny3.tokenizer)  # what the official client reads
    assert result == {"path": "M 0.25 0.375 L 0.2547 0.3766", "bbox": pytest.approx(bbox)}


def test_segment_streams_each_command_as_soon_as_the_next_one_begins(tiny3):
    words = ["M", "0", "0", "L", "9", "6", "Z", "-", "x", "L", "1", "1"]  # a stray token ends the path after Z
    out, ids = _segment_output(tiny3, words, (0.5, 0.5), (0.5, 0.25))
    skill, tok = SkillRequest("segment").skill, tiny3.cfg.tokenizer
    stream = skill.event_stream(tiny3.tokenizer)
    items = [tok.coord_id, 0.5, tok.coord_id, 0.5, tok.size_id, (0.5, 0.25), *ids]
    steps = [stream.push(item) for item in items]
    assert steps[5] == [{"type": "bbox", "bbox": pytest.approx({"x_min": 0.25, "y_min": 0.375, "x_max": 0.75, "y_max": 0.625})}]
    chunks = {i - 6: [e["chunk"] for e in step] for i, step in enumerate(steps) if i > 5 and step}
    assert chunks == {3: ["M 0.25 0.375"], 6: [" L 0.2547 0.3766"], 8: [" Z"]}  # "L" closes "M ..."; "x" closes "Z"
    result = skill.render(out, tiny3.tokenizer)
    tail = stream.finish(result)
    assert tail == [{"type": "final", "path": result["path"], "bbox": result["bbox"], "completed": True}]
    assert "".join(c for cs in chunks.values() for c in cs) == result["path"] == "M 0.25 0.375 L 0.2547 0.3766 Z"


def test_segment_reference_clamps_its_bbox_and_keeps_the_model_tokens(tiny3):
    out, ids = _segment_output(tiny3, ["M", "0", "L"])
    seg = SkillRequest("segment").skill.reference(out, tiny3.tokenizer)["segments"][0]
    assert seg["bbox"] == pytest.approx({"x_min": 0.85, "x_max": 1.0, "y_min": 0.45, "y_max": 0.55})
    assert seg["object"] == "cat" and seg["token_ids"] == ids and seg["path_tokens"] == ["M", "0", "L"]
    assert seg["svg_path"] == "M L" and "parse_error" not in seg  # the odd trailing number is dropped


@pytest.fixture(scope="module")
def md3_server(tiny3, tmp_path_factory):
    """`moonbase serve --model <a Moondream 3 directory>` in its own process, with a finetune store."""
    directory = save_dir(tiny3, tmp_path_factory.mktemp("models") / "tiny-moondream3")
    root, logs = tmp_path_factory.mktemp("finetunes"), tmp_path_factory.mktemp("logs")
    with serve_processes([["--finetunes", str(root)]], logs, 22140, model=str(directory)) as urls:
        yield urls[0]


def test_official_client_against_a_moondream3_server(md3_server, tiny3, images):
    image = Image.fromarray(images[0])
    client = md.vl(endpoint=md3_server + "/v1")
    greedy = {"temperature": 0.0, "max_tokens": 6}
    local = VL(tiny3).query(images[0], "What is it?", settings=greedy)
    assert client.query(image, "What is it?", settings=greedy) == local  # reasoning on by default, as Moondream 3
    assert isinstance(client.caption(image, settings=greedy)["caption"], str)
    assert isinstance(client.detect(image, "circle")["objects"], list) and isinstance(client.point(image, "x")["points"], list)
    url = "data:image/png;base64," + base64.b64encode(_png(image)).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
    chat = client.chat([{"role": "user", "content": content}], settings=greedy)  # model "moondream3-preview"
    assert chat["message"]["content"] == VL(tiny3).query(_decoded(image), "What is it?", settings=greedy)["answer"]
    skills = httpx.get(md3_server + "/v1/models").json()["data"][0]["skills"]
    assert skills == ["caption", "query", "detect", "point", "segment"]  # the model advertises that it segments
    whole = client.segment(image, "circle", settings=greedy)
    assert set(whole) <= {"path", "bbox"} and isinstance(whole["path"], str)
    local = VL(tiny3).segment(_decoded(image, "JPEG"), "circle", settings=greedy)  # the client sends JPEG (quality 95)
    assert whole["path"] == local["path"] and whole.get("bbox") == local["bbox"]
    items = list(client.segment(image, "circle", stream=True, settings=greedy))
    assert items[-1] == {"path": whole["path"], "bbox": whole.get("bbox"), "completed": True}
    assert "".join(i["chunk"] for i in items if "chunk" in i) == whole["path"]


@pytest.mark.parametrize(
    "bad",
    [
        {"object": ["circle"]},
        {"object": {"name": "circle"}},
        {"object": 7},
        {"object": "  "},
        {},
        {"object": "circle", "spatial_refs": [[1.5, 0.5]]},
        {"object": "circle", "spatial_refs": [[0.5]]},
        {"object": "circle", "spatial_refs": [[0.6, 0.6, 0.2, 0.2]]},
        {"object": "circle", "stream": "yes"},
        {"object": "circle", "settings": {"max_tokens": 0}},
    ],
)
def test_bad_segment_requests_get_a_400_naming_the_field(md3_server, images, bad):
    url = "data:image/png;base64," + base64.b64encode(_png(Image.fromarray(images[0]))).decode()
    for stream in (False, True):
        body = {"image_url": url, "stream": stream} | bad
        r = httpx.post(md3_server + "/v1/segment", json=body, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"]


def test_finetuning_a_moondream3_through_the_official_client(md3_server, images):
    image = Image.fromarray(images[1])
    ft = md.ft("local", name="md3", rank=8, endpoint=md3_server + "/v1/tuning")
    p = ft.rollouts("point", image=image, object="circle", num_rollouts=2, settings={"max_objects": 2})
    rl = {"mode": "rl", "request": p["request"], "rollouts": p["rollouts"], "rewards": [0.0, 1.0]}
    sft = {"mode": "sft", "request": {"skill": "query", "image": image, "question": "Word?"}, "target": {"answer": "zebra"}}
    for _ in range(25):
        out = ft.train_step([rl, sft], lr=2e-2)
    assert out["applied"] and out["step"] == 25
    assert ft.save_checkpoint()["checkpoint"]["step"] == 25
    tuned = md.vl(endpoint=md3_server + "/v1", model=ft.model(25))
    assert tuned.query(image, "Word?", reasoning=False, settings={"temperature": 0.0, "max_tokens": 8})["answer"] == "zebra"
    ft.delete()


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _decoded(image: Image.Image, fmt: str = "PNG"):
    import numpy as np

    return np.asarray(Image.open(io.BytesIO(_png(image, fmt))).convert("RGB"))


def test_int8_decode_keeps_the_experts_and_tau_and_answers_close(tiny3):
    from moonbase.model.quant import int8_text
    from moonbase.model.text import decoder

    q = int8_text(tiny3.w.text)
    assert (
        q.blocks[1]["mlp"] is tiny3.w.text.blocks[1]["mlp"]
        and q.blocks[0]["attn"]["tau"] is tiny3.w.text.blocks[0]["attn"]["tau"]
    )
    x = torch.randn(1, 5, tiny3.cfg.text.dim, generator=torch.Generator().manual_seed(0))
    want, got = (decoder(x, w, tiny3.cfg.text, tiny3.rope, torch.arange(5), None) for w in (tiny3.w.text, q))
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_segment_opens_with_its_bbox_or_nothing(tiny3, images):
    """The bbox is decided like detect's first object: an object or none (eos), then coord, then size."""
    vl, tok = VL(tiny3), tiny3.cfg.tokenizer
    for image in images:
        out = vl.wait([vl.submit(vl.prepare(SkillRequest.of("segment", image, "circle", settings={"max_tokens": 6})))])[0].output
        assert out.text.ids[:3] in ([tok.coord_id, tok.coord_id, tok.size_id], [])
        assert (len(out.text.coords) >= 2 and len(out.text.sizes) >= 1) or not out.text.ids
