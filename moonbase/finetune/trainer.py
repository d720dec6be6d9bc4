"""One fine-tune's trainable state and its train step: RL and SFT groups mixed in one optimizer step.

The policy is the base model with a trainable LoRA on the text decoder and, when asked for, trainable copies
of the region decoders (not the encoders: inference feeds values back through the base's) and the vision
encoder. The base is never modified: it keeps answering as before and is the KL reference. Step loss = mean RL
group loss + sft_weight * SFT loss; AdamW (betas 0.9 / 0.95, no weight decay) over the trainable tensors, the
request's learning rate, gradient norm clipped at 1.0; `step` counts applied steps.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..image import DEFAULT_MAX_PIXELS
from ..model.lora import Adapter, adapter_from_state_dict
from ..model.moondream import Moondream
from .lora import LoraConfig, TrainableLora
from .rl import RLConfig, rl_loss
from .sft import sft_loss
from .types import Group, RLGroup, SFTGroup


@dataclass(frozen=True)
class StepConfig:
    rl: RLConfig = field(default_factory=RLConfig)
    sft_weight: float = 1.0
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    max_pixels: int = DEFAULT_MAX_PIXELS


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


class Trainer:
    def __init__(self, base: Moondream, cfg: LoraConfig, seed: int = 0):
        self.base, self.cfg, self.step = base, cfg.validate(), 0
        self.lora = TrainableLora(base.cfg.text, cfg, seed).to(base.device)
        w = nn.Module()
        w.vision = copy.deepcopy(base.w.vision) if cfg.train_vision else base.w.vision
        w.text = base.w.text
        w.region = copy.deepcopy(base.w.region) if cfg.train_region else base.w.region
        self.policy = Moondream(base.cfg, w, base.tokenizer, name=base.name)  # freezes every weight it holds
        self.own = {k: getattr(w, k) for k, on in (("region", cfg.train_region), ("vision", cfg.train_vision)) if on}
        if cfg.train_vision:
            w.vision.requires_grad_(True)
        if cfg.train_region:  # only the decoders: the engine feeds values back through the base's encoders
            w.region.coord_decoder.requires_grad_(True)
            w.region.size_decoder.requires_grad_(True)
        self.lora.requires_grad_(True)
        self.params = [*self.lora.parameters(), *(p for mod in self.own.values() for p in mod.parameters() if p.requires_grad)]
        self.opt = torch.optim.AdamW(self.params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0)

    def adapter(self, name: str, frozen: bool = True) -> Adapter:
        """The current policy as an adapter: a frozen copy (for the engine) or the live parameters (training)."""
        a = self.lora.adapter(name, detach=frozen)
        layers = tuple({t: (x.to(self.base.dtype), y.to(self.base.dtype)) for t, (x, y) in layer.items()} for layer in a.layers)
        own = {k: copy.deepcopy(v).requires_grad_(False) if frozen else v for k, v in self.own.items()}
        return Adapter(name, layers, own.get("region"), own.get("vision"))

    def train_step(self, groups: list[Group], lr: float, cfg: StepConfig = StepConfig()) -> dict[str, Any]:
        """One optimizer step over `groups`; `applied` is False when there was no gradient (every RL group
        had equal rewards and there was no SFT group), and then `step` does not move."""
        sft = [g for g in groups if isinstance(g, SFTGroup)]
        rl = [g for g in groups if isinstance(g, RLGroup)]
        out: dict[str, Any] = dict.fromkeys(("kl", "router_kl", "grad_norm", "sft_loss", "reward_mean", "reward_std"))
        self.opt.zero_grad(set_to_none=True)
        adapter = self.adapter("train", frozen=False)
        total = None
        if sft:
            loss = sft_loss(self.policy, sft, adapter, cfg.max_pixels)
            out["sft_loss"] = float(loss.detach())
            total = cfg.sft_weight * loss
        informative = bool(sft)
        if rl:
            loss, stats = rl_loss(self.policy, rl, adapter, cfg.rl, cfg.max_pixels, self.base)
            out |= {k: stats[k] for k in ("kl", "reward_mean", "reward_std", "rl_loss", "clip_fraction", "frac_reward_zero_std")}
            informative |= stats["frac_reward_zero_std"] < 1 or cfg.rl.kl_coef > 0
            total = loss if total is None else total + loss
        if total is None or not informative or not total.requires_grad:
            return {"step": self.step, "applied": False, **out}
        total.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip))
        if not math.isfinite(norm):
            self.opt.zero_grad(set_to_none=True)
            return {"step": self.step, "applied": False, **out, "grad_norm": norm}
        for g in self.opt.param_groups:
            g["lr"], g["betas"] = lr, cfg.betas
        self.opt.step()
        self.step += 1
        return {"step": self.step, "applied": True, **out, "grad_norm": norm}

    # --- persistence --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "lora": _cpu_state(self.lora),
            "own": {k: _cpu_state(m) for k, m in self.own.items()},
            "optimizer": self.opt.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lora.load_state_dict(state["lora"])
        for k, sd in state.get("own", {}).items():
            self.own[k].load_state_dict(sd)
        self.opt.load_state_dict(state["optimizer"])
        self.step = state["step"]

    def checkpoint(self) -> dict[str, Any]:
        """What a checkpoint holds: the adapter in the Moondream variant layout (scale folded into B) under
        `lora_state_dict`, plus the trained region / vision weights when there are any."""
        out: dict[str, Any] = {"lora_state_dict": self.lora.variant_state(), "lora_config": self.cfg.to_dict(), "step": self.step}
        return out | {f"{k}_state_dict": _cpu_state(m) for k, m in self.own.items()}


def adapter_from_checkpoint(name: str, state: dict[str, Any], base: Moondream) -> Adapter:
    """A checkpoint (see `Trainer.checkpoint`) as a servable adapter."""
    adapter = adapter_from_state_dict(name, state["lora_state_dict"], base.cfg.text)
    own = {}
    for k in ("region", "vision"):
        if f"{k}_state_dict" in state:
            module = copy.deepcopy(getattr(base.w, k))
            module.load_state_dict(state[f"{k}_state_dict"])
            own[k] = module.requires_grad_(False)
    return Adapter(name, adapter.layers, own.get("region"), own.get("vision"))
