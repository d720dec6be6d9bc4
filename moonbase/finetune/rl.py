"""GRPO over rollouts sampled by the engine (finetuning.md §5).

A rollout is replayed by teacher forcing: the prompt, then exactly the sampled tokens and the coordinate
and size bins fed back, through the current policy in one forward; each action's log-probability is read
at the position before it, under the distribution it was sampled from (temperature, the same logit masks
as sampling, the two-way go-on / stop choice of detect and point). Rollouts of one request share one
packed row behind one image prefix.

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
from ..train.batch import SKILLS, Batch, Segment, pack_rows
from ..train.losses import hidden_at
from .sft import group_image, prompt_segment, request_prompt
from .types import RLGroup, Rollout, SkillRequest


@dataclass(frozen=True)
class RLConfig:
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    std_eps: float = 1e-6


@dataclass(frozen=True)
class Action:
    pos: int  # position in the segment whose output chooses it
    kind: str  # token | decide | coord | size
    label: int | tuple[int, int]
    mask: tuple[int, ...] = ()  # token ids masked out at sampling


def rollout_segment(req: SkillRequest, r: Rollout, m: Moondream) -> tuple[Segment, list[Action]]:
    """The prompt, then every sampled choice fed back, and the actions to score."""
    tok, rc = m.cfg.tokenizer, m.cfg.region
    seg = prompt_segment(request_prompt(req, m.tokenizer), m)
    acts: list[Action] = []

    def act(kind: str, label, mask=()) -> None:
        acts.append(Action(len(seg) - 1, kind, label, mask))

    if req.skill == "query":
        coords = iter(r.coords)
        if req.reasoning:
            trace = r.thinking_tokens
            for j, t in enumerate(trace):
                act("token", t, () if j == 0 else (tok.eos_id, tok.size_id))
                if j == len(trace) - 1 and not r.has_answer_separator:
                    break  # a trace cut by max_tokens: its last token is not fed, the answer token is
                if t == tok.coord_id:
                    b = next(coords, None)
                    if b is None:
                        raise TuningError("rollout: the trace has more coord tokens than coords")
                    seg.add(coord=float(region.coord_from_bin(torch.tensor(b), rc)))
                else:
                    seg.add(t)
            if r.has_answer_separator:
                act("token", tok.answer_id, (tok.eos_id, tok.size_id) if r.thinking_tokens else ())
            seg.add(tok.answer_id)
        if next(coords, None) is not None:
            raise TuningError("rollout: more coords than coord tokens in the trace")
        for j, t in enumerate(r.answer_tokens):
            act("token", t, () if j == 0 else (tok.answer_id,))
            seg.add(t)
        if r.finish_reason == "stop":
            act("token", tok.eos_id, (tok.answer_id,) if r.answer_tokens else ())
    else:
        for k in range(len(r.coords) // 2):
            x, y = r.coords[2 * k], r.coords[2 * k + 1]
            act("decide", tok.coord_id)
            act("coord", x)
            seg.add(coord=float(region.coord_from_bin(torch.tensor(x), rc)))
            act("coord", y)
            seg.add(coord=float(region.coord_from_bin(torch.tensor(y), rc)))
            if req.skill == "detect":
                act("size", r.sizes[k])
                wh = region.size_from_bin(torch.tensor(r.sizes[k]), rc).tolist()
                seg.add(size=(wh[0], wh[1]))
        if r.finish_reason == "stop":
            act("decide", tok.eos_id)
    while acts and len(seg) - 1 > acts[-1].pos:  # inputs after the last choice are never read
        seg.drop_last()
    if r.logprobs is not None and len(r.logprobs) != len(acts):
        raise TuningError(f"rollout has {len(r.logprobs)} logprobs for {len(acts)} sampled actions")
    return seg, acts


@dataclass
class RLBatch:
    batch: Batch
    row: torch.Tensor  # per action
    pos: torch.Tensor
    actions: list[Action]
    temperature: torch.Tensor
    logp_old: torch.Tensor  # NaN where the rollout recorded none
    group: torch.Tensor  # index of the action's group
    rollout: torch.Tensor  # index of the action's rollout (over the batch)
    advantage: torch.Tensor
    rewards: list[list[float]]


def advantages(rewards: list[float], eps: float) -> list[float]:
    r = torch.tensor(rewards, dtype=torch.float64)
    return ((r - r.mean()) / (r.std(unbiased=False) + eps)).tolist()


def rl_batch(groups: list[RLGroup], m: Moondream, cfg: RLConfig, max_pixels: int) -> RLBatch:
    """Every group's rollouts packed behind its image prefix (more rows of the same image when they do not
    fit the context), and one entry per action: where it is read, what it is, its old log-probability, its
    group, rollout and advantage."""
    images, rows = [], []
    col: dict[str, list] = {k: [] for k in ("row", "pos", "action", "temperature", "old", "group", "rollout", "advantage")}
    n_rollouts, prefix = 0, m.cfg.prefix_len
    for gi, g in enumerate(groups):
        image = group_image(g.request, max_pixels)
        adv = advantages(list(g.rewards), cfg.std_eps)
        row: list[tuple[int, Segment]] = []
        used = prefix
        for ri, r in enumerate(g.rollouts):
            seg, acts = rollout_segment(g.request, r, m)
            if used + len(seg) > m.cfg.text.max_context and row:
                images.append(image), rows.append(row)
                row, used = [], prefix
            old = r.logprobs if r.logprobs is not None else [float("nan")] * len(acts)
            for a, lp in zip(acts, old, strict=True):
                entry = (len(rows), used + a.pos, a, r.temperature or 1.0, lp, gi, n_rollouts, adv[ri])
                for k, v in zip(col, entry, strict=True):
                    col[k].append(v)
            row.append((SKILLS.index(g.request.skill), seg))
            used += len(seg)
            n_rollouts += 1
        images.append(image), rows.append(row)
    try:
        batch = pack_rows(images, rows, m.cfg)
    except ValueError as e:
        raise TuningError(f"a rollout is too long: {e}") from e
    long, flt = torch.long, torch.float32
    return RLBatch(
        batch,
        torch.tensor(col["row"], dtype=long),
        torch.tensor(col["pos"], dtype=long),
        col["action"],
        torch.tensor(col["temperature"], dtype=flt),
        torch.tensor(col["old"], dtype=flt),
        torch.tensor(col["group"], dtype=long),
        torch.tensor(col["rollout"], dtype=long),
        torch.tensor(col["advantage"], dtype=flt),
        [list(g.rewards) for g in groups],
    )


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
    tok = policy.cfg.tokenizer
    out = torch.zeros(n, device=policy.device)
    for kind in ("token", "decide", "coord", "size"):
        which = [i for i, a in enumerate(rb.actions) if a.kind == kind]
        if not which:
            continue
        at = torch.tensor(which, device=policy.device)
        hid, t = h[idx[at]], temp[at][:, None]
        if kind in ("token", "decide"):
            logits = lm_logits(hid, policy.w.text).float()
            if kind == "decide":  # the two-way go-on / stop choice
                logits = logits[:, [tok.coord_id, tok.eos_id]]
                labels = torch.tensor([0 if rb.actions[i].label == tok.coord_id else 1 for i in which], device=policy.device)
            else:
                mask = torch.zeros_like(logits, dtype=torch.bool)
                for j, i in enumerate(which):
                    if rb.actions[i].mask:
                        mask[j, list(rb.actions[i].mask)] = True
                logits = logits.masked_fill(mask, float("-inf"))
                labels = torch.tensor([rb.actions[i].label for i in which], device=policy.device)
            lp = torch.log_softmax(logits / t, -1).gather(-1, labels[:, None]).squeeze(-1)
        elif kind == "coord":
            logits = region.coord_logits(hid, policy.w.region).float()
            labels = torch.tensor([rb.actions[i].label for i in which], device=policy.device)
            lp = torch.log_softmax(logits / t, -1).gather(-1, labels[:, None]).squeeze(-1)
        else:
            logits = region.size_logits(hid, policy.w.region).float()  # (n, 2, bins)
            labels = torch.tensor([list(rb.actions[i].label) for i in which], device=policy.device)
            lp = torch.log_softmax(logits / t[:, :, None], -1).gather(-1, labels[:, :, None]).squeeze(-1).sum(-1)
        out = out.index_put((at,), lp)
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
    stats = {
        "clip_fraction": float((clipped < unclipped).float().mean()) if len(logp) else 0.0,
        "kl": float(kl.mean()) if kl is not None else float((old - logp.detach()).mean()) if len(logp) else 0.0,
    }
    return loss, stats


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
    flat = [r for rs in rb.rewards for r in rs]
    rewards = torch.tensor(flat, dtype=torch.float64)
    zero_std = sum(1 for rs in rb.rewards if len(set(rs)) <= 1)
    stats |= {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(unbiased=False)),
        "frac_reward_zero_std": zero_std / len(rb.rewards),
        "rl_loss": float(loss.detach()),
        "actions": len(rb.actions),
    }
    return loss, stats
