"""The tuning API against the official client (`md.ft`, `md.vl` from moondream 2.6.1) on a live local server:
the documented flow end to end, idempotency and retries, and errors that are typed, non-2xx JSON; and two
`moonbase serve` processes sharing one finetune directory."""

from __future__ import annotations

import httpx
import moondream as md
import pytest
import torch

from moonbase.api import VL
from moonbase.data.shapes import render_scene
from moonbase.finetune.store import FinetuneStore
from moonbase.finetune.trainer import adapter_from_checkpoint
from moonbase.server.app import create_app
from moonbase.server.models import ServedModels

from .serving import serve_processes, serving

QUESTION = "What is the secret word?"
GREEDY = {"temperature": 0.0, "max_tokens": 8}


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    store = FinetuneStore(tmp_path_factory.mktemp("finetunes"))
    with serving(create_app(ServedModels({"tiny": VL(tiny)}, "tiny"), finetunes=store), 22020) as url:
        yield url, store


@pytest.fixture(scope="module")
def image():
    return render_scene(seed=5, max_objects=3).image


def test_official_client_flow_teaches_an_answer_the_base_does_not_give(server, image):
    base, store = server
    ft = md.ft("local", name="secret-word", rank=8, endpoint=base + "/v1/tuning")
    assert len(ft.finetune_id) == 26 and ft.rank == 8
    assert md.ft("local", name="secret-word", rank=8, endpoint=base + "/v1/tuning").finetune_id == ft.finetune_id

    q = ft.rollouts("query", image=image, question=QUESTION, num_rollouts=4, settings={"temperature": 1.0, "max_tokens": 6})
    assert len(q["rollouts"]) == 4 and q["rewards"] is None and q["request"]["question"] == QUESTION
    assert all(len(r["logprobs"]) == len(r["answer_tokens"]) + (r["finish_reason"] == "stop") for r in q["rollouts"])
    truth = {"boxes": [{"x_min": 0.0, "y_min": 0.0, "x_max": 1.0, "y_max": 1.0}]}
    p = ft.rollouts("point", image=image, object="circle", num_rollouts=4, settings={"max_objects": 3}, ground_truth=truth)
    assert len(p["rewards"]) == 4 and all(0.0 <= r <= 1.0 for r in p["rewards"])
    for r, reward in zip(p["rollouts"], p["rewards"], strict=True):  # every point lies in the one box
        n = len(r["output"]["points"])
        assert reward == pytest.approx(2 * min(n, 1) / (n + 1))

    rl = {"mode": "rl", "request": p["request"], "rollouts": p["rollouts"], "rewards": [0.0, 1.0, 0.5, 0.25]}
    sft = {"mode": "sft", "request": {"skill": "query", "image": image, "question": QUESTION}, "target": {"answer": "zebra"}}
    out = ft.train_step([rl, sft], lr=1e-2)
    assert out["applied"] and out["step"] == 1 and out["sft_loss"] > 0 and out["reward_mean"] == pytest.approx(0.4375)
    for _ in range(34):
        out = ft.train_step([sft], lr=1e-2)
    assert out["step"] == 35
    assert ft.log_metrics(out["step"], {"eval/accuracy": 1.0}) == {"ok": True, "step": 35, "logged_count": 1}
    saved = ft.save_checkpoint()
    assert saved["ok"] and saved["checkpoint"]["step"] == 35
    assert ft.save_checkpoint()["checkpoint"] == saved["checkpoint"]  # keyed by step
    assert [c["step"] for c in ft.list_checkpoints()["checkpoints"]] == [35]

    tuned = md.vl(endpoint=base + "/v1", model=ft.model(35))
    assert tuned.query(image, QUESTION, settings=GREEDY)["answer"] == "zebra"
    assert md.vl(endpoint=base + "/v1").query(image, QUESTION, settings=GREEDY)["answer"] != "zebra"

    link = httpx.get(f"{base}/v1/tuning/finetunes/{ft.finetune_id}/checkpoints/35/download").json()["url"]
    path = store.root / "download.pt"
    path.write_bytes(httpx.get(link).content)
    assert any(k.startswith("text.blocks.0.attn.qkv") for k in torch.load(path, weights_only=True)["lora_state_dict"])

    ft.delete_checkpoint(35)
    with pytest.raises(Exception, match="404"):
        tuned.query(image, QUESTION, settings=GREEDY)
    ft.delete()
    ft.delete()  # a repeated delete is still fine (tombstone)


def _post(base: str, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(base + "/v1/tuning" + path, json=body, timeout=60, **kw)


def _sft_body(fid: str, image_url: str, **extra) -> dict:
    request = {"skill": "query", "image_url": image_url, "question": QUESTION}
    return {"finetune_id": fid, "lr": 1e-3, "groups": [{"mode": "sft", "request": request, "target": {"answer": "a"}}], **extra}


def test_identical_steps_are_applied_and_keys_make_retries_exactly_once(server, image):
    base, _ = server
    from moondream.finetune import _encode_image

    url = _encode_image(image).image_url
    fid = _post(base, "/finetunes", {"name": "idem", "rank": 16}).json()["finetune_id"]
    steps = [_post(base, "/train_step", _sft_body(fid, url)).json()["step"] for _ in range(2)]
    assert steps == [1, 2]  # the same batch twice is two epochs, not a retry
    first = _post(base, "/train_step", _sft_body(fid, url), headers={"Idempotency-Key": "k1"}).json()
    again = _post(base, "/train_step", _sft_body(fid, url), headers={"Idempotency-Key": "k1"}).json()
    assert first == again and first["step"] == 3
    body_key = _post(base, "/train_step", _sft_body(fid, url, idempotency_key="k2")).json()  # train_step(**kwargs)
    assert _post(base, "/train_step", _sft_body(fid, url, idempotency_key="k2")).json() == body_key
    assert body_key["step"] == 4
    other = _sft_body(fid, url, lr=2e-3, idempotency_key="k2")
    assert _post(base, "/train_step", other).status_code == 422
    assert httpx.get(f"{base}/v1/tuning/finetunes/{fid}").json()["step"] == 4


def test_tuning_errors_are_typed_json(server, image):
    base, _ = server
    from moondream.finetune import _encode_image

    url = _encode_image(image).image_url
    fid = _post(base, "/finetunes", {"name": "errs", "rank": 8}).json()["finetune_id"]
    cases = [
        (_post(base, "/finetunes", {"name": "errs", "rank": 16}), 409),
        (_post(base, "/finetunes", {"name": "bad name!", "rank": 8}), 400),
        (_post(base, "/finetunes", {"name": "x", "rank": 7}), 400),
        (httpx.get(f"{base}/v1/tuning/finetunes/01ARZ3NDEKTSV4RRFFQ69G5FAV"), 404),
        (httpx.delete(f"{base}/v1/tuning/finetunes/01ARZ3NDEKTSV4RRFFQ69G5FAV"), 404),
        (_post(base, "/train_step", {"finetune_id": fid, "groups": []}), 400),
        (_post(base, "/train_step", {"finetune_id": fid, "groups": [{"mode": "x"}]}), 400),
        (_post(base, "/train_step", _sft_body("01ARZ3NDEKTSV4RRFFQ69G5FAV", url)), 404),
        (_post(base, "/train_step", _sft_body(fid, url, sft_weight="x")), 400),
        (_post(base, "/train_step", _sft_body(fid, url, lr=0)), 400),
        (_post(base, "/rollouts", {"finetune_id": fid, "num_rollouts": 17, "request": {"skill": "query", "question": "q"}}), 400),
        (_post(base, "/rollouts", {"finetune_id": fid, "request": {"skill": "segment", "image_url": url, "object": "x"}}), 501),
        (httpx.post(f"{base}/v1/tuning/finetunes/{fid}/checkpoints/save"), 200),
        (httpx.delete(f"{base}/v1/tuning/finetunes/{fid}/checkpoints/9"), 404),
        (httpx.get(f"{base}/v1/tuning/finetunes/{fid}/checkpoints/9/download"), 404),
        (httpx.get(f"{base}/tuning-files/nope"), 403),
    ]
    other = _post(base, "/finetunes", {"name": "errs-2", "rank": 8}).json()["finetune_id"]
    page = httpx.get(f"{base}/v1/tuning/finetunes", params={"limit": 1, "cursor": fid}).json()
    assert page["finetunes"][0]["finetune_id"] == other and [f["name"] for f in page["finetunes"]] == ["errs-2"]
    assert httpx.get(f"{base}/v1/tuning/finetunes", params={"limit": 0}).status_code == 400
    for response, status in cases:
        assert response.status_code == status, response.text
        if status >= 400:
            assert response.json()["error"]["code"] == status
    roll = _post(
        base, "/rollouts", {"finetune_id": fid, "num_rollouts": 2, "request": {"skill": "point", "image_url": url, "object": "o"}}
    )
    rollout = roll.json()["rollouts"][0] | {"coords": [10**6, 0]}  # edited by the client: a bin out of range
    group = {"mode": "rl", "request": roll.json()["request"], "rollouts": [rollout], "rewards": [1.0]}
    assert _post(base, "/train_step", {"finetune_id": fid, "groups": [group]}).status_code == 400
    group = {"mode": "rl", "request": roll.json()["request"], "rollouts": roll.json()["rollouts"], "rewards": [1.0]}
    assert _post(base, "/train_step", {"finetune_id": fid, "groups": [group]}).status_code == 400  # rewards != rollouts
    query = {"image_url": url, "question": QUESTION, "model": f"moondream3-preview/{fid}@5"}
    assert httpx.post(f"{base}/v1/query", json=query).status_code == 404
    assert httpx.post(f"{base}/v1/query", json=query | {"model": f"moondream3-preview/{fid}@0"}).status_code == 200


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory):
    """Two real `moonbase serve` processes on one --finetunes directory (replicas sharing a registry)."""
    root, logs = tmp_path_factory.mktemp("shared-finetunes"), tmp_path_factory.mktemp("logs")
    with serve_processes([["--finetunes", str(root)]] * 2, logs, 22040) as urls:
        yield urls, FinetuneStore(root)


def _image_url(image) -> str:
    from moondream.finetune import _encode_image

    return _encode_image(image).image_url


def _step_of(base: str, fid: str) -> int:
    return httpx.get(f"{base}/v1/tuning/finetunes/{fid}").json()["step"]


def test_two_servers_on_one_directory_apply_every_step(two_servers, image, tiny):
    (a, b), store = two_servers
    url = _image_url(image)
    fid = _post(a, "/finetunes", {"name": "shared", "rank": 8}).json()["finetune_id"]
    assert _post(b, "/finetunes", {"name": "shared", "rank": 8}).json()["finetune_id"] == fid
    steps = [_post((a, b)[i % 2], "/train_step", _sft_body(fid, url)).json()["step"] for i in range(8)]
    assert steps == list(range(1, 9))  # each server sees the other's steps, none is lost
    assert [_step_of(a, fid), _step_of(b, fid)] == [8, 8]
    logged = httpx.get(f"{b}/v1/tuning/finetunes/{fid}/metrics").json()["metrics"]
    assert sorted(map(int, logged)) == list(range(1, 9)) and all("train/sft_loss" in v for v in logged.values())

    saved = httpx.post(f"{a}/v1/tuning/finetunes/{fid}/checkpoints/save").json()["checkpoint"]
    assert saved["step"] == 8 and httpx.post(f"{b}/v1/tuning/finetunes/{fid}/checkpoints/save").json()["checkpoint"] == saved
    assert _post(b, "/train_step", _sft_body(fid, url)).json()["step"] == 9
    assert httpx.post(f"{a}/v1/tuning/finetunes/{fid}/checkpoints/save").json()["checkpoint"]["step"] == 9
    for base in (a, b):
        assert [c["step"] for c in httpx.get(f"{base}/v1/tuning/finetunes/{fid}/checkpoints").json()["checkpoints"]] == [8, 9]
        for step in (8, 9):
            query = {"image_url": url, "question": QUESTION, "model": f"moondream3-preview/{fid}@{step}", "settings": GREEDY}
            assert httpx.post(f"{base}/v1/query", json=query, timeout=60).status_code == 200
    weights = {}
    for step in (8, 9):
        loaded = store.load_checkpoint(fid, step)
        assert loaded["step"] == step
        weights[step] = adapter_from_checkpoint(f"x{step}", loaded, tiny).layers[0]["qkv"][1]
    assert not torch.equal(weights[8], weights[9])  # server A saved the step B trained, not its own copy


def test_an_idempotency_key_applied_on_one_server_is_not_applied_again_on_the_other(two_servers, image):
    (a, b), _ = two_servers
    url = _image_url(image)
    fid = _post(a, "/finetunes", {"name": "shared-key", "rank": 8}).json()["finetune_id"]
    assert [_post(s, "/train_step", _sft_body(fid, url)).json()["step"] for s in (b, a)] == [1, 2]  # both hold it
    first = _post(a, "/train_step", _sft_body(fid, url), headers={"Idempotency-Key": "once"}).json()
    again = _post(b, "/train_step", _sft_body(fid, url), headers={"Idempotency-Key": "once"}).json()  # a retry
    assert first["step"] == 3 and again == first
    other = _post(b, "/train_step", _sft_body(fid, url, lr=2e-3), headers={"Idempotency-Key": "once"})
    assert other.status_code == 422
    assert [_step_of(a, fid), _step_of(b, fid)] == [3, 3]


def test_a_finetune_deleted_on_one_server_is_gone_on_the_other(two_servers, image):
    (a, b), store = two_servers
    url = _image_url(image)
    fid = _post(a, "/finetunes", {"name": "shared-gone", "rank": 8}).json()["finetune_id"]
    assert [_post(s, "/train_step", _sft_body(fid, url)).json()["step"] for s in (a, b)] == [1, 2]
    assert httpx.delete(f"{a}/v1/tuning/finetunes/{fid}").status_code == 200
    roll = {"finetune_id": fid, "num_rollouts": 1, "request": {"skill": "query", "image_url": url, "question": QUESTION}}
    assert _post(b, "/rollouts", roll).status_code == 404  # B's cached session is not served
    assert _post(b, "/train_step", _sft_body(fid, url)).status_code == 404
    assert httpx.post(f"{b}/v1/tuning/finetunes/{fid}/checkpoints/save").status_code == 404
    assert httpx.get(f"{b}/v1/tuning/finetunes/{fid}").status_code == 404
    assert sorted(p.name for p in (store.root / fid).iterdir() if not p.name.startswith(".")) == ["meta.json"]  # no resurrection
