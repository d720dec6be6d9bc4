"""Full fine-tuning: the model's own weights trained (not a LoRA), saved as a model directory that `--model DIR`
loads (the official safetensors key layout, so other tools load it too).

* `full`: the whole text model, plus the region encoders and decoders when the data has detect or point
  examples; the vision encoder stays frozen unless `train_vision` (the public walkthroughs' setup).
* `region_only`: only the region encoders and decoders, with the loss on the coordinate and size bins alone
  (as the region-head write-ups do for detection on new kinds of imagery).

Examples are taught exactly as LoRA SFT teaches them (`Skill.teach`, packed by train/batch.py, scored by
train/losses.py); gradients accumulate over `grad_accum` micro-batches of `batch` examples; AdamW with a
linear warm-up and cosine decay; gradient clipping at 1.0. The run directory holds `checkpoint.pt` (written
atomically every `checkpoint_every` steps: a rerun resumes from it) and `train_log.jsonl`; the model
directory is written (atomically, file by file, in the base's dtype) at the end. Training keeps float32 weights
and optimizer state (bf16 weights would swallow updates this small); on CUDA the forward runs under bf16
autocast with gradient checkpointing of the decoder blocks (each block recomputed in the backward pass)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..atomic import atomic_path
from ..errors import TuningError
from ..hub import save_dir
from ..model.moondream import Moondream
from ..train.batch import SKILLS, pack_rows, transcript
from ..train.losses import losses
from ..train.schedule import warmup_cosine
from .data import LabeledRequest
from .sft import group_image


class Scope(str, Enum):
    FULL = "full"
    REGION_ONLY = "region_only"


@dataclass(frozen=True)
class FullConfig:
    scope: Scope = Scope.FULL
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: int = 1
    batch: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5
    warmup: float = 0.1  # fraction of the steps
    weight_decay: float = 0.0
    train_vision: bool = False
    train_region: bool | None = None  # None: when the data has examples that locate (detect, point, segment)
    checkpoint_every: int = 50
    gradient_checkpointing: bool | None = None  # None: on CUDA (memory), off on the CPU (speed)
    seed: int = 0
    max_pixels: int = 64_000_000
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch < 1 or self.grad_accum < 1 or self.epochs < 1 or not self.lr > 0:
            raise TuningError("batch, grad_accum and epochs must be positive, and lr above zero")


def trainable(w: torch.nn.Module, cfg: FullConfig, regions: bool) -> list[tuple[str, torch.nn.Parameter]]:
    parts = ["region"] if cfg.scope is Scope.REGION_ONLY else ["text"] + ["region"] * regions + ["vision"] * cfg.train_vision
    return [(n, p) for n, p in w.named_parameters() if n.split(".", 1)[0] in parts]


def fine_tune_full(base: Moondream, examples: list[LabeledRequest], run_dir: str | Path, cfg: FullConfig = FullConfig()) -> Path:
    """Train a copy of `base` on `examples`; returns the model directory (`run_dir/model`)."""
    if not examples:
        raise TuningError("no examples to train on")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    locating = any(e.request.skill.locates for e in examples)
    regions = cfg.train_region if cfg.train_region is not None else locating
    if cfg.scope is Scope.REGION_ONLY and not locating:
        raise TuningError("--region-only trains on detect, point or segment examples; the data has none")
    # a float32 copy: the base keeps serving unchanged, and updates of lr ~1e-5 would vanish in bf16 weights
    m = Moondream(base.cfg, copy.deepcopy(base.w).float(), base.tokenizer, base.name)
    params = trainable(m.w, cfg, regions)
    for _, p in params:
        p.requires_grad_(True)
    decay = [p for n, p in params if p.dim() >= 2 and "wte" not in n]
    rest = [p for n, p in params if not (p.dim() >= 2 and "wte" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95)
    )
    per_step = cfg.batch * cfg.grad_accum
    total = cfg.steps or max(1, math.ceil(len(examples) * cfg.epochs / per_step))
    step, ckpt_path = 0, run_dir / "checkpoint.pt"
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=m.device, weights_only=False)
        if state["total"] != total or state["n_examples"] != len(examples):
            raise TuningError(f"{ckpt_path} belongs to another run ({state['n_examples']} examples, {state['total']} steps)")
        m.w.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if m.device.type == "cuda" else contextlib.nullcontext()
    order = _order(len(examples), total * per_step, cfg.seed)
    log = open(run_dir / "train_log.jsonl", "a")
    bar = tqdm(total=total, initial=step, desc=f"fine-tune ({cfg.scope.value})", unit="step", disable=not cfg.progress)
    t0 = time.perf_counter()
    try:
        while step < total:
            for g in opt.param_groups:
                g["lr"] = _lr(step, total, cfg)
            opt.zero_grad(set_to_none=True)
            record: dict[str, float] = {}
            for k in range(cfg.grad_accum):
                at = (step * cfg.grad_accum + k) * cfg.batch
                micro = [examples[i] for i in order[at : at + cfg.batch]]
                with autocast:
                    parts = _losses(m, micro, cfg)
                (parts["loss"] / cfg.grad_accum).backward()
                for name, v in parts.items():
                    record[name] = record.get(name, 0.0) + float(v.detach()) / cfg.grad_accum
            torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            opt.step()
            step += 1
            record = {k: round(v, 4) for k, v in record.items()} | {"step": step, "lr": _lr(step - 1, total, cfg)}
            log.write(json.dumps(record | {"seconds": round(time.perf_counter() - t0, 1)}) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == total:
                state = {"model": m.w.state_dict(), "optimizer": opt.state_dict(), "step": step, "total": total}
                state |= {"n_examples": len(examples), "config": _jsonable(cfg)}
                with atomic_path(ckpt_path) as tmp:
                    torch.save(state, tmp)
                log.flush()
    finally:
        bar.close()
        log.close()
    m.w.requires_grad_(False)
    return save_dir(Moondream(m.cfg, m.w.to(base.dtype), m.tokenizer, m.name), run_dir / "model")  # the base's dtype


def _losses(m: Moondream, examples: list[LabeledRequest], cfg: FullConfig) -> dict[str, torch.Tensor]:
    rows = []
    for e in examples:
        prompt, moves = e.request.skill.teach(e.request, e.target, m.tokenizer, m.cfg)
        rows.append([(SKILLS.index(e.request.skill.name), transcript(prompt, moves, m.cfg.tokenizer))])
    try:
        batch = pack_rows([group_image(e.request, cfg.max_pixels) for e in examples], rows, m.cfg)
    except ValueError as err:
        raise TuningError(f"a target is too long: {err}") from err
    recompute = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else m.device.type == "cuda"
    parts = losses(m, batch, checkpoint=recompute)
    if cfg.scope is Scope.REGION_ONLY:  # the loss on the coordinate and size bins alone
        zero = parts["token"] * 0.0
        parts["loss"] = parts.get("coord", zero) + parts.get("size", zero)
    return parts


def _order(n: int, needed: int, seed: int) -> list[int]:
    """Example indices for the whole run: epochs of shuffled passes, so a resumed run sees the same batches."""
    rng, out = random.Random(seed), []
    while len(out) < needed:
        epoch = list(range(n))
        rng.shuffle(epoch)
        out += epoch
    return out


def _lr(step: int, total: int, cfg: FullConfig) -> float:
    return warmup_cosine(step, total, cfg.lr, max(1, round(cfg.warmup * total)), floor=0.1)


def _jsonable(cfg: FullConfig) -> dict[str, Any]:
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(cfg).items()}
