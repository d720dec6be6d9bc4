"""Fine-tuning demonstrations on nano (CPU), through the same service the tuning API uses: training steps,
engine-sampled rollouts, checkpoints, and greedy evaluation of the served checkpoint
(`model=<base>/<finetune_id>@<step>`). Prints one JSON object per demo.

python bench/finetune_nano.py --demo sft-captcha   # SFT: read digit captchas (nano's baseline is ~0)
python bench/finetune_nano.py --demo captcha-lora-vs-full   # the walkthrough's captcha experiment: LoRA vs --full
python bench/finetune_nano.py --demo rl-largest    # RL: "point to the largest shape", rewarded by ground truth
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from moonbase.api import VL
from moonbase.bench import machine
from moonbase.data.captcha import QUESTION, captcha_example
from moonbase.data.shapes import render_scene
from moonbase.finetune.data import LabeledRequest
from moonbase.finetune.rollouts import sample_rollouts
from moonbase.finetune.run import evaluate
from moonbase.finetune.service import TuningService
from moonbase.finetune.store import FinetuneStore
from moonbase.finetune.types import RLGroup, SFTGroup, parse_rollout
from moonbase.hub import nano
from moonbase.skills import SkillRequest
from moonbase.skills.training import Target


def captcha(seed: int) -> LabeledRequest:
    ex = captcha_example(seed)
    t = ex.tasks[0]
    return LabeledRequest(SkillRequest("query", ex.image, question=QUESTION), Target(t.answer), {}, f"captcha:{seed}")


def largest(seed: int) -> LabeledRequest | None:
    """A scene with a clearly largest shape (area at least 1.3x the next), or None."""
    scene = render_scene(seed, max_objects=5)
    shapes = sorted(scene.shapes, key=lambda s: s.w * s.h, reverse=True)
    if len(shapes) < 2 or shapes[0].w * shapes[0].h < 1.3 * shapes[1].w * shapes[1].h:
        return None
    req = SkillRequest("point", np.asarray(scene.image), object="largest shape", settings=(("max_objects", 4),))
    return LabeledRequest(req, Target(boxes=(shapes[0].box,)), {}, f"scene:{seed}")


def scenes(start: int, n: int) -> list[LabeledRequest]:
    out, seed = [], start
    while len(out) < n:
        ex = largest(seed)
        seed += 1
        if ex is not None:
            out.append(ex)
    return out


def char_accuracy(svc: TuningService, examples: list[LabeledRequest], variant: str | None) -> float:
    """Digits in the right place / digits, greedy (a finer view than exact match)."""
    settings = {"temperature": 0.0, "max_tokens": 8} | ({"variant": variant} if variant else {})
    hit = total = 0
    for ex in examples:
        got = svc.vl.query(ex.request.image, QUESTION, settings=settings)["answer"].strip()
        want = ex.target.answer
        hit += sum(a == b for a, b in zip(got, want, strict=False))
        total += len(want)
    return hit / total


def sft_captcha(svc: TuningService, a: argparse.Namespace) -> dict:
    train = [captcha(1_000_000 + i) for i in range(a.train_examples)]
    held = [captcha(2_000_000 + i) for i in range(a.eval_examples)]
    fid = svc.create("captcha-sft", a.rank, {"train_vision": a.train_vision})["finetune_id"]
    before = {"exact_match": evaluate(svc, held, None, max_tokens=8), "char_accuracy": char_accuracy(svc, held, None)}
    t0, log = time.process_time(), []
    w0 = time.perf_counter()
    for s in range(a.steps):
        batch = [train[(s * a.batch + i) % len(train)] for i in range(a.batch)]
        out = svc.train_groups(fid, [SFTGroup(ex.request, ex.target) for ex in batch], a.lr)
        if (s + 1) % 100 == 0:
            log.append({"step": s + 1, "sft_loss": round(out["sft_loss"], 4), "wall_s": round(time.perf_counter() - w0, 1)})
            print(json.dumps(log[-1]), flush=True)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    step = svc.save_checkpoint(fid)["checkpoint"]["step"]
    variant = f"{fid}@{step}"
    after = {"exact_match": evaluate(svc, held, variant, max_tokens=8), "char_accuracy": char_accuracy(svc, held, variant)}
    return {
        "demo": "sft-captcha",
        "data": f"{a.train_examples} training captchas (3-5 digits, moonbase.data.captcha), {a.eval_examples} held out",
        "settings": {k: getattr(a, k) for k in ("steps", "batch", "lr", "rank", "train_vision")},
        "before": before,
        "after": after,
        "train_cpu_s": round(cpu, 1),
        "train_wall_s": round(wall, 1),
        "loss_log": log,
    }


def captcha_lora_vs_full(svc: TuningService, a: argparse.Namespace) -> dict:
    """The same captchas, steps and batch through a LoRA (`--lr`) and full fine-tunes (each `--full-lr`), side by side."""
    lora = sft_captcha(svc, a)
    train = [captcha(1_000_000 + i) for i in range(a.train_examples)]
    held = [captcha(2_000_000 + i) for i in range(a.eval_examples)]
    full = [full_captcha(svc, train, held, a, lr) | {"before": lora["before"]} for lr in a.full_lr]
    return {"demo": "captcha-lora-vs-full", "data": lora["data"], "lora": lora, "full": full}


def full_captcha(svc: TuningService, train: list[LabeledRequest], held: list[LabeledRequest], a, lr: float) -> dict:
    from moonbase.finetune.full import FullConfig, fine_tune_full
    from moonbase.hub import load_dir

    cfg = FullConfig(steps=a.steps, batch=a.batch, lr=lr, train_vision=a.train_vision, progress=False)
    t0, w0 = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory() as run:
        tuned = TuningService(VL(load_dir(fine_tune_full(svc.vl.model, train, run, cfg))), svc.store, "nano")
        cpu, wall = time.process_time() - t0, time.perf_counter() - w0
        records = [json.loads(line) for line in open(Path(run) / "train_log.jsonl")]
        after = {"exact_match": evaluate(tuned, held, None, max_tokens=8), "char_accuracy": char_accuracy(tuned, held, None)}
    log = [{"step": r["step"], "sft_loss": r["loss"], "wall_s": r["seconds"]} for r in records if r["step"] % 100 == 0]
    print(json.dumps({"full_lr": lr, "after": after}), flush=True)
    settings = {"steps": a.steps, "batch": a.batch, "lr": lr, "warmup": cfg.warmup, "train_vision": a.train_vision}
    return {"settings": settings, "after": after, "train_cpu_s": round(cpu, 1), "train_wall_s": round(wall, 1), "loss_log": log}


def rl_largest(svc: TuningService, a: argparse.Namespace) -> dict:
    train, held = scenes(3_000_000, a.train_examples), scenes(4_000_000, a.eval_examples)
    fid = svc.create("largest-rl", a.rank, {"train_region": a.train_region})["finetune_id"]
    before = evaluate(svc, held, None)
    t0, w0, log = time.process_time(), time.perf_counter(), []
    for s in range(a.steps):
        at, live = svc.session(fid).policy
        batch = [train[(s * a.batch + i) % len(train)] for i in range(a.batch)]

        def group(ex: LabeledRequest, live=live, at=at) -> RLGroup:
            rollouts = sample_rollouts(svc.vl, ex.request, a.rollouts, live, at)
            rewards = tuple(ex.request.skill.reward(r["output"], ex.target) for r in rollouts)
            return RLGroup(ex.request, tuple(parse_rollout(ex.request.skill, r, svc.vl.model.cfg) for r in rollouts), rewards)

        with ThreadPoolExecutor(len(batch)) as pool:  # every rollout of the step meets in the engine's batch
            groups = list(pool.map(group, batch))
        out = svc.train_groups(fid, groups, a.lr)
        log.append({"step": s + 1, "reward_mean": round(out["reward_mean"], 4), "applied": out["applied"]})
        print(json.dumps(log[-1] | {"wall_s": round(time.perf_counter() - w0, 1)}), flush=True)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    step = svc.save_checkpoint(fid)["checkpoint"]["step"]
    after = evaluate(svc, held, f"{fid}@{step}")
    return {
        "demo": "rl-largest",
        "task": 'point(image, "largest shape") on shape scenes with 2-5 shapes whose largest is >= 1.3x the next; '
        "reward = F1 of points inside the largest shape's box",
        "settings": {k: getattr(a, k) for k in ("steps", "batch", "rollouts", "lr", "rank", "train_region")},
        "held_out_mean_reward_before": round(before, 4),
        "held_out_mean_reward_after": round(after, 4),
        "held_out": len(held),
        "train_rollout_reward_first_5_steps": round(float(np.mean([r["reward_mean"] for r in log[:5]])), 4),
        "train_rollout_reward_last_5_steps": round(float(np.mean([r["reward_mean"] for r in log[-5:]])), 4),
        "train_cpu_s": round(cpu, 1),
        "train_wall_s": round(wall, 1),
        "steps_applied": sum(r["applied"] for r in log),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", required=True, choices=("sft-captcha", "captcha-lora-vs-full", "rl-largest"))
    p.add_argument("--full-lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3], help="captcha-lora-vs-full: full runs' lrs")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--train-vision", action="store_true")
    p.add_argument("--train-region", action="store_true")
    p.add_argument("--train-examples", type=int, default=None)
    p.add_argument("--eval-examples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    sft = a.demo != "rl-largest"
    defaults = {"steps": 1200 if sft else 40, "batch": 16 if sft else 8, "lr": 2e-3 if sft else 1e-3}
    defaults |= {"train_examples": 4000 if sft else 400, "eval_examples": 200 if sft else 100}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    torch.manual_seed(a.seed)
    m = nano()
    vl = VL(m)
    with tempfile.TemporaryDirectory() as root:
        svc = TuningService(vl, FinetuneStore(root), "nano")
        demos = {"sft-captcha": sft_captcha, "captcha-lora-vs-full": captcha_lora_vs_full, "rl-largest": rl_largest}
        result = demos[a.demo](svc, a)
    print(json.dumps(result | {"model": "nano", "device": "cpu", "machine": machine(torch.device("cpu"))}))


if __name__ == "__main__":
    main()
