"""GPU benchmark of the engine on the full-size Moondream 2 architecture with random bf16 weights.

python bench/md2_gpu.py --out bench/results/DATE-md2-h100.json

Workload (ChartQA-like): a new 1024x768 image per request, a ~20-token question, answers of at most
8 tokens (random weights rarely stop early, so answers are 8 tokens). Reports, measured in one run:
- bs1_p50_ms: one request at a time, image to answer;
- bs64_rps: 64 closed-loop clients, each request about its own new image;
- bs64_rps_4q: 64 clients, 4 questions per image in turn (the last 3 hit the image-prefix cache;
  its latencies are per image);
- bs1_decode_tps: output tokens per second of one long answer after its first token;
- pipelined_vs_blocking: bs64_rps with the pipelined loop over the blocking loop;
- graphs_vs_eager_decode: bs1 decode rate with CUDA graphs over launching every kernel from Python.
Random weights make no sense of the image; the cost per request is the real model's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from moonbase.api import VL
from moonbase.bench import closed_loop, machine
from moonbase.config import md2
from moonbase.engine.engine import Engine, EngineConfig
from moonbase.model.moondream import Moondream, build_model
from moonbase.tokenizer import SPECIAL_TOKENS, Tokenizer

ANSWER = {"temperature": 0.0, "max_tokens": 8}


def random_md2(device: str = "cuda", seed: int = 0) -> Moondream:
    """Moondream 2's shapes with weights drawn on the device (no 8 GB host copy), and a word-level
    tokenizer over its 51,200 ids so questions encode and any sampled id decodes."""
    cfg = md2()
    with torch.device("meta"):
        w = build_model(cfg)
    w = w.to_empty(device=device).to(torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in w.named_parameters():
            if ".ln" in name or "post_ln" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
        w.text.lm_head.bias[cfg.tokenizer.eos_id] = -1e4  # answers run to max_tokens: a fixed cost per request
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab |= {f"w{i}": i for i in range(len(vocab), cfg.text.vocab_size)}
    hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="w100"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(SPECIAL_TOKENS)
    return Moondream(cfg, w, Tokenizer(hf, cfg.tokenizer), name="moondream2-random-bf16")


def images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8) for _ in range(n)]


def question(rng: np.random.Generator) -> str:
    return " ".join(f"w{i}" for i in rng.integers(1000, 50000, 20))


def asking(vl: VL, imgs: list[np.ndarray], clients: int, per_image: int = 1) -> dict[str, float]:
    """`clients` threads; each takes the next image and asks `per_image` questions about it in turn
    (latencies are per image)."""
    rng = np.random.default_rng(0)
    questions = [[question(rng) for _ in range(per_image)] for _ in imgs]

    def job(i: int) -> None:
        for q in questions[i]:
            vl.query(imgs[i], q, settings=ANSWER)

    return closed_loop(len(imgs), clients, job, per_image)


def decode_rate(vl: VL, tokens: int) -> float:
    """Output tokens per second after the first token, one sequence alone."""
    stats: dict[str, Any] = {}
    vl.query(
        images(1, 7)[0], question(np.random.default_rng(0)), settings={"temperature": 0.0, "max_tokens": tokens}, stats=stats
    )
    assert stats["output_tokens"] == tokens, stats
    return (stats["output_tokens"] - 1) / ((stats["total_ms"] - stats["ttft_ms"]) / 1000)


def profile(vl: VL, imgs: list[np.ndarray], clients: int, path: Path) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        asking(vl, imgs, clients)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30)
    table += "\n\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    path.write_text(table)


def run(args: argparse.Namespace) -> dict[str, Any]:
    m = random_md2(args.device)
    out: dict[str, Any] = {"model": m.name, "workload": "new 1024x768 image, 20-token question, 8-token answer"}
    for tag, cfg in (
        ("eager", EngineConfig(max_batch=64, pipeline=True, cuda_graphs=False)),
        ("blocking", EngineConfig(max_batch=64, pipeline=False)),
        ("pipelined", EngineConfig(max_batch=64, pipeline=True)),
    ):
        engine = Engine(m, cfg)
        vl = VL(m, engine=engine)
        asking(vl, images(16, 1), 16)  # warm-up: allocator, kernels, threads, graph capture
        asking(vl, images(4, 1), 1)
        out[f"bs1_{tag}"] = asking(vl, images(args.bs1, 2), 1)
        out[f"bs1_decode_tps_{tag}"] = decode_rate(vl, args.decode_tokens)
        if tag != "eager":
            out[f"bs64_{tag}"] = asking(vl, images(args.requests, 3), 64)
        if tag == "pipelined":
            out["bs64_4q_pipelined"] = asking(vl, images(args.requests // 4, 4), 64, per_image=4)
            if args.profile:
                profile(vl, images(64, 5), 64, Path(args.profile))
        engine.close()
        del engine, vl
        torch.cuda.empty_cache()
    out["bs1_p50_ms"] = out["bs1_pipelined"]["p50_ms"]
    out["bs64_rps"] = out["bs64_pipelined"]["rps"]
    out["bs64_rps_4q"] = out["bs64_4q_pipelined"]["rps"]
    out["pipelined_vs_blocking"] = out["bs64_pipelined"]["rps"] / out["bs64_blocking"]["rps"]
    out["pipelined_vs_blocking_bs1"] = out["bs1_blocking"]["p50_ms"] / out["bs1_pipelined"]["p50_ms"]
    out["bs1_decode_tps"] = out["bs1_decode_tps_pipelined"]
    out["graphs_vs_eager_decode"] = out["bs1_decode_tps_pipelined"] / out["bs1_decode_tps_eager"]
    out["machine"] = machine(torch.device("cuda"))
    out["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--bs1", type=int, default=32, help="requests in the one-at-a-time run")
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--profile", default=None, help="write a torch.profiler table of a bs64 run here")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = run(args)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
