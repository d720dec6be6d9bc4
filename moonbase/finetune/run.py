"""Training loops over examples, for Python callers and the CLI: SFT, or RL with rewards from a Python
callable or from ground truth; greedy evaluation of a held-out split before and after; the final
checkpoint saved (and served as `<base>/<finetune_id>@<step>`). Example: docs/finetuning.md, "From Python".
"""

from __future__ import annotations

import dataclasses
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from ..image import load_image
from .data import LabeledRequest, split
from .rewards import RewardFn
from .rollouts import sample_rollouts
from .service import TuningService
from .types import RLGroup, SFTGroup, parse_rollout


@dataclass(frozen=True)
class RunConfig:
    mode: str = "sft"  # sft | rl
    rank: int = 16
    steps: int | None = None  # None: one epoch
    batch: int = 8  # examples (groups) per step
    lr: float = 2e-3
    held_out: float = 0.1  # a fraction (< 1) or a count
    rollouts: int = 8  # rl: per example
    temperature: float = 1.0  # rl: rollout temperature
    kl_coef: float = 0.0
    options: tuple[tuple[str, Any], ...] = ()  # finetune options: targets, train_region, train_vision, alpha
    seed: int = 0
    progress: bool = True


def _score(ex: LabeledRequest, output: dict[str, Any], reward: RewardFn | None) -> float:
    """The user's reward clipped to [0, 1], else the skill's own against the example's target."""
    return min(1.0, max(0.0, float(reward(ex.row, output)))) if reward else ex.request.skill.reward(output, ex.target)


def evaluate(
    svc: TuningService, examples: list[LabeledRequest], variant: str | None, reward: RewardFn | None = None, max_tokens: int = 64
) -> float:
    """Mean greedy score over `examples` (several at once, so the engine batches them)."""
    vl = svc.vl
    settings = {"temperature": 0.0, "max_tokens": max_tokens} | ({"variant": variant} if variant else {})

    def score(ex: LabeledRequest) -> float:
        r = ex.request
        out = vl.run(dataclasses.replace(r, image=load_image(r.image, vl.limits.max_pixels), settings=settings))
        return _score(ex, out, reward)

    if not examples:
        return float("nan")
    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(score, examples)) / len(examples)


def rl_step(svc: TuningService, fid: str, batch: list[LabeledRequest], cfg: RunConfig, reward: RewardFn | None) -> dict[str, Any]:
    """Rollouts of every example of the batch at once (they meet in the engine's batch), scored, one step."""
    step, live = svc.session(fid).policy
    m = svc.vl.model

    def group(ex: LabeledRequest) -> RLGroup:
        settings = dict(ex.request.settings) | {"temperature": cfg.temperature}
        req = dataclasses.replace(ex.request, settings=tuple(sorted(settings.items())))
        rollouts = sample_rollouts(svc.vl, req, cfg.rollouts, live, step)
        scores = tuple(_score(ex, r["output"], reward) for r in rollouts)
        return RLGroup(ex.request, tuple(parse_rollout(req.skill, r, m.cfg) for r in rollouts), scores)

    with ThreadPoolExecutor(len(batch)) as pool:
        groups = list(pool.map(group, batch))
    step_cfg = dataclasses.replace(svc.step_cfg, rl=dataclasses.replace(svc.step_cfg.rl, kl_coef=cfg.kl_coef))
    return svc.train_groups(fid, groups, cfg.lr, step_cfg)


def fine_tune(
    svc: TuningService, name: str, examples: list[LabeledRequest], cfg: RunConfig, reward: RewardFn | None = None
) -> dict[str, Any]:
    """Create (or resume, by name) a finetune, train it on `examples` minus a held-out split, evaluate the
    split before and after, save the final checkpoint. Returns a summary with the model string."""
    train, held = split(examples, cfg.held_out, cfg.seed)
    fid = svc.create(name, cfg.rank, dict(cfg.options))["finetune_id"]
    start = svc.session(fid).trainer.step
    if start:  # resuming: evaluate the adapter as it is now
        svc.save_checkpoint(fid)
    before = evaluate(svc, held, f"{fid}@{start}" if start else None, reward)
    steps = cfg.steps or max(1, len(train) // cfg.batch)
    if cfg.progress:
        print(
            f"finetune {fid}: {len(train)} train / {len(held)} held out, {steps} steps; held-out score {before:.4f}",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=f"finetune {cfg.mode}", unit="step", dynamic_ncols=True, disable=not cfg.progress)
    for s in bar:
        batch = [train[(s * cfg.batch + i) % len(train)] for i in range(cfg.batch)]
        if cfg.mode == "sft":
            out = svc.train_groups(fid, [SFTGroup(ex.request, ex.target) for ex in batch], cfg.lr)
        else:
            out = rl_step(svc, fid, batch, cfg, reward)
        bar.set_postfix({k: f"{out[k]:.4f}" for k in ("sft_loss", "reward_mean", "grad_norm") if out.get(k) is not None})
    seconds = time.perf_counter() - t0
    step = svc.session(fid).trainer.step
    svc.save_checkpoint(fid)
    after = evaluate(svc, held, f"{fid}@{step}", reward)
    return {
        "finetune_id": fid,
        "model": f"{svc.base_name}/{fid}@{step}",
        "steps": step - start,
        "train_seconds": round(seconds, 1),
        "held_out": len(held),
        "score_before": round(before, 4),
        "score_after": round(after, 4),
    }
