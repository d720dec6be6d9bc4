"""GRPO over rollouts sampled by the engine (finetuning.md §5).

A rollout is replayed by teacher forcing: the prompt, then exactly the sampled tokens and the coordinate
and size bins fed back (its skill's `replay` moves), through the current policy in one forward; each
action's log-probability is read at the position before it, under the distribution it was sampled from
(temperature, the same logit masks as sampling, the two-way go-on / stop choice of detect and point).

Loss per action: -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) with rho = exp(logp - logp_old)
and A = (r - mean_group r) / (std_group r + eps) (population std); averaged over the actions of a group
(token level), then over groups. logp_old is the rollout's recorded sampling log-probability, or the
current one (rho = 1) for a rollout that carries none. Optional KL to the base model (the adapter off):
the k3 estimator exp(d) - d - 1, d = logp_base - logp, with coefficient `kl_coef`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import TuningError
from ..model import region
from ..model.lora import Adapter
from ..model.moondream import Moondream
from ..model.text import lm_logits
from ..skills import Prompt
from ..skills.program import Head
from ..skills.training import Move
from ..train.batch import SKILLS, Batch, Segment, pack_rows, transcript
from ..train.losses import hidden_at
from .sft import group_image
from .types import RLGroup


@dataclass(frozen=True)
class RLConfig:
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    std_eps: float = 1e-6


def rollout_segment(prompt: Prompt, moves: list[Move], m: Moondream) -> tuple[Segment, list[tuple[int, Move]]]:
    """A rollout's prompt and moves as one segment, and its actions with the positions whose outputs chose them."""
    at, acts = len(prompt.ids) - 1, []
    for move in moves:
        if move.action and move.label is not None:
            acts.append((at, move))
        at += move.feed is not None
    return transcript(prompt, moves, m.cfg.tokenizer), acts


@dataclass
class RLBatch:
    batch: Batch
    row: torch.Tensor  # per action
    pos: torch.Tensor
    actions: list[Move]
    temperature: torch.Tensor
    logp_old: torch.Tensor  # NaN where the rollout recorded none
    group: torch.Tensor  # index of the action's group
    rollout: torch.Tensor  # index of the action's rollout (over the batch)
    advantage: torch.Tensor
    rewards: list[list[float]]


def rl_batch(groups: list[RLGroup], m: Moondream, cfg: RLConfig, max_pixels: int) -> RLBatch:
    """Every group's rollouts packed behind its image prefix (more rows of the same image when they do not
    fit the context), and one entry per action: where it is read, what it is, its old log-probability, its
    group, rollout and advantage."""
    images, rows = [], []
    col: dict[str, list] = {k: [] for k in ("row", "pos", "actions", "temperature", "logp_old", "group", "rollout", "advantage")}
    n_rollouts, prefix = 0, m.cfg.prefix_len
    for gi, g in enumerate(groups):
        image = group_image(g.request, max_pixels)
        rewards = torch.tensor(g.rewards, dtype=torch.float64)
        adv = ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + cfg.std_eps)).tolist()  # the group's advantages
        row: list[tuple[int, Segment]] = []
        used = prefix
        for ri, r in enumerate(g.rollouts):
            seg, acts = rollout_segment(*g.request.skill.replay(g.request, r, m.tokenizer, m.cfg), m)
            if r.logprobs is not None and len(r.logprobs) != len(acts):
                raise TuningError(f"rollout has {len(r.logprobs)} logprobs for {len(acts)} sampled actions")
            if used + len(seg) > m.cfg.text.max_context and row:
                images.append(image), rows.append(row)
                row, used = [], prefix
            old = r.logprobs if r.logprobs is not None else [float("nan")] * len(acts)
            for (pos, a), lp in zip(acts, old, strict=True):
                entry = (len(rows), used + pos, a, r.temperature or 1.0, lp, gi, n_rollouts, adv[ri])
                for k, v in zip(col, entry, strict=True):
                    col[k].append(v)
            row.append((SKILLS.index(g.request.skill.name), seg))
            used += len(seg)
            n_rollouts += 1
        images.append(image), rows.append(row)
    try:
        batch = pack_rows(images, rows, m.cfg)
    except ValueError as e:
        raise TuningError(f"a rollout is too long: {e}") from e
    floats = ("temperature", "logp_old", "advantage")
    tensors = {k: torch.tensor(v, dtype=torch.float32 if k in floats else torch.long) for k, v in col.items() if k != "actions"}
    return RLBatch(batch, actions=col["actions"], rewards=[list(g.rewards) for g in groups], **tensors)


def action_logprobs(policy: Moondream, rb: RLBatch, adapter: Adapter | None) -> torch.Tensor:
    """log pi(action) under `policy` (+ `adapter`) for every action of the batch, (N,)."""
    n, t_max = len(rb.actions), rb.batch.ids.shape[1]
    if n == 0:
        return torch.zeros(0, device=policy.device)
    select = torch.zeros(rb.batch.ids.shape, dtype=torch.bool)
    select[rb.row, rb.pos] = True
    h = hidden_at(policy, rb.batch, select, adapter)
    keys = rb.row * t_max + rb.pos
    idx = torch.searchsorted(torch.unique(keys), keys).to(policy.device)
    temp = rb.temperature.clamp_min(1e-6).to(policy.device)
    out = torch.zeros(n, device=policy.device)
    kinds: dict[tuple[Head, int], list[int]] = {}  # actions by head, and how many ids a token chose among (0: all)
    for i, a in enumerate(rb.actions):
        kinds.setdefault((a.head, len(a.decisions)), []).append(i)
    for (head, decide), which in kinds.items():
        at = torch.tensor(which, device=policy.device)
        hid, t = h[idx[at]], temp[at][:, None]
        acts = [rb.actions[i] for i in which]
        if head is Head.SIZE:
            logits = region.size_logits(hid, policy.w.region).float()  # (n, 2, bins)
            labels = torch.tensor([list(a.label) for a in acts], device=policy.device)
            lp = torch.log_softmax(logits / t[:, :, None], -1).gather(-1, labels[:, :, None]).squeeze(-1).sum(-1)
            out = out.index_put((at,), lp)
            continue
        if head is Head.COORD:
            logits = region.coord_logits(hid, policy.w.region).float()
            labels = [a.label for a in acts]
        elif decide:  # go on or stop: the other ids are not actions
            choices = torch.tensor([a.decisions for a in acts], device=policy.device)
            logits = lm_logits(hid, policy.w.text).float().gather(-1, choices)
            labels = [a.decisions.index(a.label) for a in acts]
        else:
            logits = lm_logits(hid, policy.w.text).float()
            mask = torch.zeros_like(logits, dtype=torch.bool)
            for j, a in enumerate(acts):
                mask[j, list(a.mask)] = True  # nothing for an empty mask
            logits = logits.masked_fill(mask, float("-inf"))
            labels = [a.label for a in acts]
        index = torch.tensor(labels, device=policy.device)[:, None]
        out = out.index_put((at,), torch.log_softmax(logits / t, -1).gather(-1, index).squeeze(-1))
    return out


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantage: torch.Tensor,
    group: torch.Tensor,
    cfg: RLConfig,
    logp_ref: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate (+ kl_coef * k3 KL to `logp_ref`), token-level within a group, then the mean
    over groups. Also returns the clip fraction and the KL reported to the client."""
    old = torch.where(torch.isnan(logp_old), logp.detach(), logp_old.to(logp))
    ratio = torch.exp(logp - old)
    adv = advantage.to(logp)
    unclipped, clipped = ratio * adv, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * adv
    per_action = -torch.minimum(unclipped, clipped)
    kl = None
    if logp_ref is not None:
        d = logp_ref.to(logp) - logp
        kl = torch.exp(d) - d - 1
        per_action = per_action + cfg.kl_coef * kl
    groups = torch.unique(group)
    loss = torch.stack([per_action[group == g].mean() for g in groups]).mean() if len(groups) else logp.sum() * 0
    return loss, {
        "clip_fraction": float((clipped < unclipped).float().mean()) if len(logp) else 0.0,
        "kl": float(kl.mean()) if kl is not None else float((old - logp.detach()).mean()) if len(logp) else 0.0,
    }


def rl_loss(
    policy: Moondream, groups: list[RLGroup], adapter: Adapter, cfg: RLConfig, max_pixels: int, reference: Moondream | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    rb = rl_batch(groups, policy, cfg, max_pixels)
    logp = action_logprobs(policy, rb, adapter)
    ref = None
    if cfg.kl_coef > 0 and reference is not None:
        with torch.no_grad():
            ref = action_logprobs(reference, rb, None)
    loss, stats = grpo_loss(logp, rb.logp_old, rb.advantage, rb.group, cfg, ref)
    rewards = torch.tensor([r for rs in rb.rewards for r in rs], dtype=torch.float64)
    stats |= {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
        "frac_reward_zero_std": sum(len(set(rs)) <= 1 for rs in rb.rewards) / len(rb.rewards),
        "rl_loss": float(loss.detach()),
        "actions": len(rb.actions),
    }
    return loss, stats
