"""`moonbase finetune` end to end on the tiny random model: SFT and RL from JSONL (with a user reward given as
module:function), PEFT export and import; and the service's handling of a duplicate step in flight."""

from __future__ import annotations

import json
import sys
import threading
import time
import types

import numpy as np
from PIL import Image

from moonbase.cli import main
from moonbase.data.shapes import render_scene
from moonbase.finetune.store import FinetuneStore


def _data(tmp_path) -> str:
    Image.fromarray(np.asarray(render_scene(5, max_objects=3).image)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "question": f"Word {i}?", "answer": "zebra"} for i in range(6)]
    rows += [{"image": "a.png", "object": "circle", "points": [[0.5, 0.5]], "boxes": [[0.0, 0.0, 1.0, 1.0]]}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_sft_then_rl_then_peft_export_and_import(tmp_path, capsys, monkeypatch):
    data, store = _data(tmp_path), str(tmp_path / "store")
    common = ["--model", "tiny-random", "--store", store, "--held-out", "2", "--batch", "2"]
    assert main(["finetune", "sft", data, "--name", "words", "--steps", "4", "--lr", "1e-2", *common]) == 0
    sft = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sft["steps"] == 4 and sft["model"] == f"tiny-random/{sft['finetune_id']}@4" and sft["held_out"] == 2
    assert 0 <= sft["score_before"] <= 1 and 0 <= sft["score_after"] <= 1

    calls = []
    module = types.ModuleType("my_rewards")
    module.score = lambda row, output: calls.append((row, output)) or (hash(json.dumps(output)) % 1000) / 1000  # distinct outputs
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    rl = ["finetune", "rl", data, "--name", "words", "--steps", "2", "--rollouts", "3", "--reward", "my_rewards:score", *common]
    assert main(rl) == 0  # the same name resumes the same finetune
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["finetune_id"] == sft["finetune_id"] and out["steps"] == 2
    assert calls and all("image" in row for row, _ in calls)

    peft = tmp_path / "peft"
    assert main(["finetune", "export", sft["finetune_id"], "--peft", str(peft), "--store", store]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == f"{sft['finetune_id']}@6"
    assert (peft / "adapter_config.json").is_file() and (peft / "adapter_model.safetensors").is_file()
    assert main(["finetune", "import", str(peft), "--name", "back", "--model", "tiny-random", "--store", store]) == 0
    imported = json.loads(capsys.readouterr().out)
    reg = FinetuneStore(store)
    a = reg.load_checkpoint(sft["finetune_id"], 6)["lora_state_dict"]
    b = reg.load_checkpoint(imported["finetune_id"], 0)["lora_state_dict"]
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)
    assert main(["finetune", "list", "--store", store]) == 0
    assert "words" in capsys.readouterr().out
    assert main(["finetune", "sft", str(tmp_path / "missing.jsonl"), *common]) == 2


def test_a_duplicate_step_in_flight_gets_its_twins_result(tiny, tmp_path):
    from moonbase.api import VL
    from moonbase.finetune.service import TuningService

    svc = TuningService(VL(tiny), FinetuneStore(tmp_path), "tiny-random")
    fid = svc.create("twins", 8)["finetune_id"]
    image = np.asarray(render_scene(5, max_objects=3).image)
    body = {
        "finetune_id": fid,
        "groups": [{"mode": "sft", "request": {"skill": "query", "image": image, "question": "q"}, "target": {"answer": "a"}}],
    }
    trainer = svc.session(fid).trainer
    started, release, real = threading.Event(), threading.Event(), trainer.train_step

    def slow(*args, **kwargs):
        started.set()
        release.wait(10)
        return real(*args, **kwargs)

    trainer.train_step = slow
    results = []
    first = threading.Thread(target=lambda: results.append(svc.train_step(body)))
    first.start()
    started.wait(10)
    second = threading.Thread(target=lambda: results.append(svc.train_step(dict(body))))  # a retry while the first runs
    second.start()
    time.sleep(0.5)  # the retry reaches the service (a dictionary look-up) well within this
    release.set()
    first.join(10), second.join(10)
    assert len(results) == 2 and results[0] == results[1] and results[0]["step"] == 1
    assert svc.train_step(body)["step"] == 2  # once finished, the same body again is a new step
