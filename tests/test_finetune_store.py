"""The finetune store on disk: ids, idempotent creation, crash safety, and processes sharing it. A
subprocess really is SIGKILLed in the middle of a checkpoint save (and of a train-state save); what it
leaves must load. (Two servers training one finetune: tests/test_server_tuning.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from moonbase.errors import FinetuneConflictError, FinetuneNotFoundError
from moonbase.finetune.store import FinetuneStore, new_ulid

SAVE_THEN_CRASH = textwrap.dedent(
    """
    import sys
    import torch
    from moonbase.finetune import store
    from moonbase.finetune.lora import LoraConfig
    from moonbase.finetune.trainer import Trainer
    from moonbase.hub import tiny_random

    root, fid, point = sys.argv[1], sys.argv[2], sys.argv[3]
    finetunes = store.FinetuneStore(root)
    trainer = Trainer(tiny_random(seed=0), LoraConfig(rank=8))
    with torch.no_grad():
        for p in trainer.lora.b.values():
            p.fill_(0.5)  # step 2 differs from step 1
    trainer.step = 2
    store.crash_at = point
    if point.startswith("state"):
        finetunes.save_state(fid, trainer.state_dict() | {"responses": {}})
    else:
        finetunes.save_checkpoint(fid, 2, trainer.checkpoint())
    print("not killed")
    """
)

LOG_METRICS = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from moonbase.finetune.store import FinetuneStore

    root, fid, who, ready = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    store = FinetuneStore(root)
    (ready / who).touch()
    while len(list(ready.iterdir())) < 2:  # start together, so that the writes interleave
        time.sleep(0.001)
    for i in range(40):
        store.log_metrics(fid, 1, {f"{who}/{i}": float(i)})
    """
)


def test_ulids_are_crockford_and_sort_by_time():
    a, b = new_ulid(1_000), new_ulid(2_000)
    assert len(a) == 26 and a < b and set(a) <= set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")
    same_ms = [new_ulid(3_000) for _ in range(50)]
    assert same_ms == sorted(same_ms) and len(set(same_ms)) == 50


def test_create_is_idempotent_by_name_and_rank(tmp_path):
    store = FinetuneStore(tmp_path)
    info, created = store.create("a", 8, "tiny", {"rank": 8})
    again, created_again = store.create("a", 8, "tiny", {"rank": 8})
    assert created and not created_again and again.finetune_id == info.finetune_id
    with pytest.raises(FinetuneConflictError):
        store.create("a", 16, "tiny", {"rank": 16})
    store.delete(info.finetune_id)
    store.delete(info.finetune_id)  # tombstone: a repeated delete is fine
    with pytest.raises(FinetuneNotFoundError):
        store.get(info.finetune_id)
    assert store.create("a", 16, "tiny", {"rank": 16})[0].finetune_id != info.finetune_id  # the name is free again
    results = []
    threads = [threading.Thread(target=lambda: results.append(store.create("b", 8, "tiny", {})[0].finetune_id)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1


@pytest.mark.parametrize("point", ["checkpoint:tensors-written", "checkpoint:between-files", "state:written"])
def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_loadable(tiny, tmp_path, point):
    from moonbase.finetune.lora import LoraConfig
    from moonbase.finetune.trainer import Trainer, adapter_from_checkpoint

    store = FinetuneStore(tmp_path)
    fid = store.create("crash", 8, "tiny-random", {"rank": 8})[0].finetune_id
    trainer = Trainer(tiny, LoraConfig(rank=8))
    trainer.step = 1
    store.save_checkpoint(fid, 1, trainer.checkpoint())
    store.save_state(fid, trainer.state_dict() | {"responses": {}})
    proc = subprocess.run([sys.executable, "-c", SAVE_THEN_CRASH, str(tmp_path), fid, point], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert [c["step"] for c in store.checkpoints(fid)] == [1]  # the interrupted checkpoint does not exist
    loaded = store.load_checkpoint(fid, 1)
    adapter = adapter_from_checkpoint("x", loaded, tiny)
    assert float(adapter.layers[0]["qkv"][1].abs().max()) == 0.0  # step 1's weights, not the half-written step 2
    assert store.load_state(fid)["step"] == 1
    leftovers = [p.name for p in (tmp_path / fid).rglob("*.tmp")]
    assert (point != "checkpoint:between-files") == bool(leftovers)  # killed inside a write: only its temp file remains
    store.save_checkpoint(fid, 2, trainer.checkpoint())  # and the next save of that step works
    assert [c["step"] for c in store.checkpoints(fid)] == [1, 2]
    assert torch.load(store.checkpoint_path(fid, 2), weights_only=True)["step"] == 1


def test_processes_logging_metrics_at_once_lose_none(tmp_path):
    store = FinetuneStore(tmp_path / "root")
    fid = store.create("metrics", 8, "tiny", {})[0].finetune_id
    (tmp_path / "ready").mkdir()
    args = [str(store.root), fid]
    procs = [subprocess.Popen([sys.executable, "-c", LOG_METRICS, *args, who, str(tmp_path / "ready")]) for who in "ab"]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert len(store.metrics(fid)["1"]) == 80  # each read-modify-write of metrics.json held the finetune's lock
