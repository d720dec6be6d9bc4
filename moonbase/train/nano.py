"""The `nano` model: config, tokenizer and from-scratch training recipe on the synthetic mixture.

python -m moonbase train nano --out runs/nano          # at most 59 minutes (the cap) on a 2-core CPU
python -m moonbase train nano --out runs/nano --resume  # continue from runs/nano/checkpoint.pt
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from ..atomic import atomic_path
from ..config import Defaults, ModelConfig, RegionConfig, TextConfig, VisionConfig
from ..data.mix import synthetic_example
from ..data.text import WORDS
from ..device import pick_device
from ..hub import save_dir, tiny_config
from ..model.init import init_weights
from ..model.moondream import Moondream, build_model
from ..tokenizer import (
    SEGMENT_TOKEN,
    SPECIAL_TOKENS,
    TASK_TOKENS,
    Tokenizer,
    add_path_numbers,
    byte_level_tokenizer,
    task_token_templates,
)
from .args import TrainArgs
from .batch import make_batch
from .feed import prefetch
from .losses import image_probe, losses, vision_losses
from .schedule import warmup_cosine


def corpus(n_examples: int, seed: int) -> Iterator[str]:
    yield from WORDS
    for i in range(n_examples):
        for task in synthetic_example("train", seed, i).tasks:
            yield task.arg
            if task.answer:
                yield task.answer


def build_tokenizer(vocab_size: int = 1024, n_examples: int = 4000, seed: int = 0, segment: bool = False) -> HFTokenizer:
    """Byte-level BPE over the synthetic texts; digits stay single tokens (captchas are read digit by digit). With
    `segment`: the segment task token, and the path numbers as whole tokens (`path_number_tokens`)."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + TASK_TOKENS + ([SEGMENT_TOKEN] if segment else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(n_examples, seed), trainer=trainer)
    return add_path_numbers(tok) if segment else tok


def nano_config(tok: HFTokenizer) -> ModelConfig:
    vocab = -(-tok.get_vocab_size() // 64) * 64
    return ModelConfig(
        vision=VisionConfig(
            enc_dim=128,
            enc_patch_size=14,
            enc_n_layers=4,
            enc_ff_dim=512,
            enc_n_heads=4,
            proj_inner_dim=512,
            proj_out_dim=256,
            crop_size=126,
            max_crops=1,
            overlap_margin=1,
        ),
        text=TextConfig(dim=256, ff_dim=1024, n_layers=4, vocab_size=vocab, max_context=768, n_heads=4, n_kv_heads=4),
        region=RegionConfig(
            dim=256, coord_feat_dim=128, coord_out_dim=256, size_feat_dim=128, size_out_dim=512, inner_dim=512, size_min_log2=-8.0
        ),
        tokenizer=task_token_templates(tok),
        defaults=Defaults(temperature=0.0, top_p=1.0, max_tokens=128, max_objects=20),
    ).validate()


def render_step(step: int, a: TrainArgs, tokenizer: Tokenizer, cfg: ModelConfig):
    """The batch of training step `step`: a pure function of the step, so resumed runs see the same data.
    Vision pre-training steps come first: shape scenes only, their tasks unused."""
    if step < a.vision_steps:
        scenes = [
            synthetic_example("vision", a.seed, step * a.vision_batch + i, "shapes", locate_tasks=0)
            for i in range(a.vision_batch)
        ]
        return make_batch([dataclasses.replace(ex, tasks=()) for ex in scenes], tokenizer, cfg)
    step -= a.vision_steps
    cap = 8 if a.curriculum <= 0 else min(8, 3 + int(6 * step / (a.curriculum * a.steps)))
    recipe = dict(
        max_objects=cap, locate_tasks=a.locate_tasks, phrase_mix=a.phrase_mix, drills=a.drills, segment_tasks=a.segment_tasks
    )
    examples = [synthetic_example("train", a.seed, step * a.batch_images + i, **recipe) for i in range(a.batch_images)]
    return make_batch(examples, tokenizer, cfg)


def lr_at(step: int, a: TrainArgs) -> float:
    """Warm-up, then cosine decay to 5% of the peak: once over the vision phase, once over the main phase."""
    if step < a.vision_steps:
        peak, steps = a.vision_lr, a.vision_steps
    else:
        peak, steps, step = a.lr, a.steps, step - a.vision_steps
    return warmup_cosine(step, steps, peak, min(a.warmup, steps // 2), floor=0.05)


def train(a: TrainArgs) -> Path:
    """Train (or resume) a run in `a.out`; a resumed run ends bit-identical to an uninterrupted one on the same device."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    # some CPU backward kernels accumulate across threads in varying order; resume tests need exact replay
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(a)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _train(a: TrainArgs) -> Path:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    ckpt_path = out / "checkpoint.pt"
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True) if a.resume and ckpt_path.is_file() else None
    if state is not None:
        hf_tok = HFTokenizer.from_str(state["tokenizer"])
        cfg = ModelConfig.from_dict(state["config"])
        if state["args"] != dataclasses.asdict(a) | {"resume": state["args"]["resume"]}:
            print(f"note: resuming with changed arguments (checkpoint had {state['args']})")
    elif a.model == "tiny":
        hf_tok = byte_level_tokenizer(TASK_TOKENS + [SEGMENT_TOKEN] * (a.segment_tasks > 0))
        hf_tok = add_path_numbers(hf_tok) if a.segment_tasks > 0 else hf_tok
        # byte-level ids make a shape scene's packed row (eight locate tasks, drills) up to ~830 tokens long
        cfg = tiny_config(task_token_templates(hf_tok), hf_tok.get_vocab_size(), max_context=1024)
    else:
        hf_tok = build_tokenizer(seed=a.seed, segment=a.segment_tasks > 0)
        cfg = nano_config(hf_tok)
    device = pick_device(a.device)
    weights = build_model(cfg)
    if state is None:
        init_weights(weights, a.seed)
    else:
        weights.load_state_dict(state["model"])
    weights = weights.to(device)
    m = Moondream(cfg, weights, Tokenizer(hf_tok, cfg.tokenizer), name="nano")
    weights.requires_grad_(True)
    probe = None
    if a.probe_weight > 0 or a.vision_steps > 0:
        probe = image_probe(cfg.text.dim, cfg.vision.grid if a.probe_position else 0).to(device)
    if probe is not None and state is not None and "probe" in state:
        probe.load_state_dict(state["probe"])
    decay = [p for n, p in weights.named_parameters() if p.dim() >= 2 and "wte" not in n and "pos_emb" not in n]
    no_decay = [p for n, p in weights.named_parameters() if not (p.dim() >= 2 and "wte" not in n and "pos_emb" not in n)]
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if probe is not None:
        groups.append({"params": list(probe.parameters()), "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.98))
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    log = open(out / "train_log.jsonl", "a")
    n_params = sum(p.numel() for p in weights.parameters())
    total = a.vision_steps + a.steps
    print(f"nano: {n_params / 1e6:.2f}M parameters, vocab {cfg.text.vocab_size}, device {device}, step {step}/{total}")
    if step < a.vision_steps:
        print(f"steps 1-{a.vision_steps} train the vision side alone, {a.vision_batch} scenes each")

    t0 = time.perf_counter()
    elapsed = elapsed0 = (state or {}).get("elapsed", 0.0)
    batches = prefetch(functools.partial(render_step, a=a, tokenizer=m.tokenizer, cfg=cfg), step, total, a.workers)
    bar = tqdm(total=total, initial=step, desc="train nano", unit="step", dynamic_ncols=True)
    for batch in batches:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        if step < a.vision_steps:
            assert probe is not None
            parts = vision_losses(m, batch, probe)
        else:
            main_step = step - a.vision_steps
            sigma = a.label_sigma[0] + (a.label_sigma[1] - a.label_sigma[0]) * min(1.0, main_step / max(1, a.steps - 1))
            main_probe = probe if a.probe_weight > 0 else None
            parts = losses(m, batch, sigma, a.attn_weight, probe=main_probe, probe_weight=a.probe_weight)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(weights.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed = elapsed0 + time.perf_counter() - t0
        record = {k: round(float(v.detach()), 4) for k, v in parts.items()}
        record |= {"step": step, "lr": lr_at(step - 1, a), "elapsed": round(elapsed, 1)}
        log.write(json.dumps(record) + "\n")
        bar.set_postfix({k: f"{record.get(k, 0):.3f}" for k in ("loss", "token", "coord", "probe")})
        bar.update(1)
        done = step == total or (bool(a.max_minutes) and elapsed > 60 * a.max_minutes)
        if step % a.checkpoint_every == 0 or done:
            ckpt = {"model": weights.state_dict(), "optimizer": opt.state_dict(), "step": step, "config": cfg.to_dict()}
            ckpt |= {"tokenizer": hf_tok.to_str(), "args": dataclasses.asdict(a), "elapsed": elapsed}
            if probe is not None:  # a training-only head, but needed to resume exactly
                ckpt["probe"] = probe.state_dict()
            with atomic_path(ckpt_path) as tmp:
                torch.save(ckpt, tmp)
            log.flush()
        if done:
            break
    bar.close()
    batches.close()
    log.close()
    weights.requires_grad_(False)
    final = out / "model"
    save_dir(m, final)
    print(f"saved {final} after {step} steps, {elapsed / 60:.1f} min")
    return final
