"""Command line: `python -m moonbase <command>` (also installed as `moonbase`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from .errors import MoonbaseError
from .eval.cli import add_parser as add_eval_parser
from .finetune.cli import DEFAULT_STORE
from .finetune.cli import add_parser as add_finetune_parser
from .jobs.cli import add_parser as add_batch_parser
from .jobs.cli import ray_flags

NOTES = {
    "tiny-random": "note: tiny-random is a randomly initialized model for tests; its answers are meaningless "
    "(the default is the trained nano; pass --model DIR for real weights).",
}
UNITS = {"": 1, "k": 2**-10, "m": 1, "g": 2**10}


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="built-in name, model directory or hub id (default: the embedded model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on CUDA)")
    g = p.add_argument_group("engine", "memory and batching of the inference engine (sizes in MiB: 256MB, 2GB, ...)")
    g.add_argument("--kv-memory", type=_mib, metavar="SIZE", help="KV cache pool (default: a full batch at max context, capped)")
    g.add_argument("--prefix-cache", type=_mib, metavar="SIZE", help="most of it idle cached image prefixes keep (default: all)")
    g.add_argument("--max-batch", type=_positive, default=32, metavar="N", help="sequences decoded at once (default 32)")
    g.add_argument("--max-step-tokens", type=_positive, default=4096, metavar="N", help="prefill tokens per step (default 4096)")
    g.add_argument("--max-crops", type=_positive, metavar="N", help="tile budget per image (default: the model's; fewer: faster)")
    g.add_argument("--pipeline", action=argparse.BooleanOptionalAction, help="overlap host and device work (default: on CUDA)")
    g.add_argument("--int8-decode", action="store_true", help="CPU: int8 weights for decode steps (faster, approximate)")


def _mib(text: str) -> float:
    """'256', '256MB', '1.5 GiB' -> MiB (KB/MB/GB are read as KiB/MiB/GiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*", text.lower())
    if m is None or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size like 256MB or 2GB, got {text!r}")
    return float(m[1]) * UNITS[m[2]]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _settings_args(p: argparse.ArgumentParser, objects: bool = False) -> None:
    if objects:
        p.add_argument("--max-objects", type=int, default=None)
    else:
        for flag, kind in (("--temperature", float), ("--top-p", float), ("--max-tokens", int), ("--seed", int)):
            p.add_argument(flag, type=kind, default=None)
        p.add_argument("--stream", action="store_true", help="print text as it is generated")


def _settings(a: argparse.Namespace) -> dict[str, Any]:
    keys = ("temperature", "top_p", "max_tokens", "seed", "max_objects")
    return {k: getattr(a, k) for k in keys if getattr(a, k, None) is not None}


def engine_args(a: argparse.Namespace) -> dict[str, Any]:
    """The command line's device, dtype and engine knobs, as `moonbase.vl` keywords (Ray actors and replicas
    load their own model with them)."""
    knobs = dict(device=a.device, dtype=a.dtype, kv_memory_mb=a.kv_memory, prefix_cache_mb=a.prefix_cache)
    knobs |= dict(max_batch=a.max_batch, max_step_tokens=a.max_step_tokens, max_crops=a.max_crops)
    return knobs | dict(pipeline=a.pipeline, int8_decode=a.int8_decode)


def vl_from_args(a: argparse.Namespace):
    """The model the command line names, with its engine knobs; `<base>/<finetune_id>@<step>` serves that
    finetune checkpoint (from $MOONBASE_FINETUNES, default ~/.cache/moonbase/finetunes) on every request."""
    from . import vl
    from .finetune.store import split_checkpoint

    base, checkpoint = split_checkpoint(a.model) if a.model else (a.model, None)
    model = vl(base, **engine_args(a))
    if checkpoint is not None:
        from .finetune.service import TuningService
        from .finetune.store import FinetuneStore

        TuningService(model, FinetuneStore(os.environ.get("MOONBASE_FINETUNES", DEFAULT_STORE)), model.model.name)
        model.variant = checkpoint
    if model.model.name in NOTES:
        print(NOTES[model.model.name], file=sys.stderr)
    return model


def _show(a: argparse.Namespace, skill: str, image: Any, arg: str, **kw: Any) -> dict[str, Any]:
    """Run one skill request (`arg`: its main argument); print its result as JSON, or its text as it is generated
    (--stream)."""
    from .skills import SkillRequest

    req = SkillRequest.of(skill, image, arg, settings=_settings(a), **kw)
    stream = getattr(a, "stream", False) and req.skill.text_key is not None
    result = vl_from_args(a).run(req, stream)
    if not stream:
        print(json.dumps(result, indent=2))
        return result
    pieces = result.pop(req.skill.text_key)
    if result:  # what comes before the text (a reasoning trace)
        print(json.dumps(result, indent=2))
    for piece in pieces:
        print(piece, end="", flush=True)
    print()
    return result


def cmd_caption(a: argparse.Namespace) -> int:
    _show(a, "caption", a.image, a.length)
    return 0


def cmd_query(a: argparse.Namespace) -> int:
    refs = json.loads(a.spatial_refs) if a.spatial_refs else None
    _show(a, "query", None if a.image == "-" else a.image, a.question, reasoning=a.reasoning, spatial_refs=refs)
    return 0


def cmd_locate(a: argparse.Namespace) -> int:
    from .draw import annotate

    result = _show(a, a.command, a.image, a.object)
    if a.draw:
        annotate(
            a.image, result.get("objects", []), result.get("points", []), a.draw, [result["path"]] if result.get("path") else []
        )
        print(f"wrote {a.draw}", file=sys.stderr)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """The main job: every skill on one image, results as JSON, boxes and points drawn into a PNG."""
    from .data.shapes import render_scene
    from .draw import annotate
    from .skills import REGISTRY

    model = vl_from_args(a)
    if (image := a.image) is None:
        scene = render_scene(seed=7, n_objects=4, size=(384, 384))
        image = Path(a.out).with_name("demo-input.png")
        image.parent.mkdir(parents=True, exist_ok=True)
        scene.image.save(image)
        print(f"no image given: rendered a sample scene to {image} ({', '.join(s.label for s in scene.shapes)})", file=sys.stderr)
    t0 = time.perf_counter()
    encoded = model.encode_image(image)
    settings = {"temperature": 0.0, "max_tokens": a.max_tokens}
    result = {
        "image": str(image),
        "caption": model.caption(encoded, "normal", settings=settings)["caption"],
        "question": a.question,
        "answer": model.query(encoded, a.question, settings=settings)["answer"],
        "object": a.object,
        "objects": model.detect(encoded, a.object, {"max_objects": 20})["objects"],
        "points": model.point(encoded, a.object, {"max_objects": 20})["points"],
    }
    if REGISTRY["segment"].supports(model.model.cfg):  # nano and Moondream 3; Moondream 2 does not segment
        result["segment"] = model.segment(encoded, a.object)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(result, indent=2))
    paths = [result["segment"]["path"]] if result.get("segment", {}).get("path") else []
    annotate(image, result["objects"], result["points"], a.out, paths=paths)
    print(f"wrote {a.out} (boxes in magenta, points in cyan{', the mask filled' if paths else ''})", file=sys.stderr)
    return 0


def cmd_parity(a: argparse.Namespace) -> int:
    from .eval.parity import main as parity_main

    return parity_main(a.directory, a.json)


def cmd_train(a: argparse.Namespace) -> int:
    from .train.args import TrainArgs
    from .train.nano import train

    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainArgs) if "help" in f.metadata}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}  # nargs: a list
    train(TrainArgs(**given))
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    """A flag for each TrainArgs field made with `flag`; unset ones keep the field's default."""
    from .train.args import TrainArgs

    for f in dataclasses.fields(TrainArgs):
        if "help" not in f.metadata:
            continue
        kw = dict(f.metadata, default=None)
        if isinstance(f.default, bool):  # --resume: a switch; --probe-position: on unless --no-probe-position
            kw["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
            shown = "on" if f.default else "off"
        else:
            kw.setdefault("type", {"int": int, "float": float}.get(f.type.split(" | ")[0], str))
            shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        if shown is not None:
            kw["help"] += f" (default {shown})"
        p.add_argument("--" + f.name.replace("_", "-"), **kw)


def cmd_models(a: argparse.Namespace) -> int:
    from .hub import local_models

    for m in local_models():
        print(f"{m['name']:<32} {m['kind']:<10} {m['note']}")
    return 0


def cmd_pull(a: argparse.Namespace) -> int:
    from .hub import hub_snapshot

    path = hub_snapshot(a.repo, a.revision)  # huggingface_hub shows its own progress bars
    print(path)
    if not (path / "tokenizer.json").is_file() or "moondream2" in a.repo:
        print(
            "note: Moondream 2 needs the tokenizer.json of moondream/starmie-v1 next to model.safetensors "
            "(the repository's own tokenizer.json is a stale GPT-2 one); see the README",
            file=sys.stderr,
        )
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from .finetune.store import FinetuneStore
    from .server.app import ServerConfig
    from .server.run import DEFAULT_PORT, serve

    cfg = ServerConfig(
        allow_remote_images=a.allow_remote_images,
        allow_file_images=a.allow_file_images,
        allow_adapter_paths=a.allow_adapter_paths,
        api_key=a.api_key,
        max_body_mb=a.max_body_mb,
        max_in_flight=a.max_in_flight,
        timeout_s=a.timeout,
    )
    if a.ray:
        from .server.ray_serve import serve_ray

        address = None if a.ray == "local" else a.ray
        serve_ray(a.model, engine_args(a), cfg, a.host, a.port or DEFAULT_PORT, a.replicas, address)
        return 0
    vl = vl_from_args(a)
    finetunes = None if a.finetunes == "none" else FinetuneStore(a.finetunes)
    serve(vl, vl.model.name, a.host, a.port, cfg, finetunes, a.root_path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moonbase", description="Run Moondream vision-language models locally.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="caption, query, detect, point (and segment) on one image; writes an annotated PNG")
    p.add_argument("image", nargs="?", default=None, help="image file (default: a rendered sample scene)")
    p.add_argument("--question", default="How many circles are there?")
    p.add_argument("--object", default="circle")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", default="out/demo.png")
    _model_args(p)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("caption", help="describe an image")
    p.add_argument("image")
    p.add_argument("--length", default="normal", choices=("short", "normal", "long"))
    _model_args(p), _settings_args(p)
    p.set_defaults(fn=cmd_caption)

    p = sub.add_parser("query", help="answer a question about an image ('-' for no image)")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--reasoning", action="store_true")
    p.add_argument("--spatial-refs", default=None, help='JSON list of [x, y] or [x1, y1, x2, y2], e.g. "[[0.5, 0.5]]"')
    _model_args(p), _settings_args(p)
    p.set_defaults(fn=cmd_query)

    for name, what in (("detect", "bounding boxes"), ("point", "points"), ("segment", "the outline (SVG path, Moondream 3)")):
        p = sub.add_parser(name, help=f"{what} of an object in an image")
        p.add_argument("image")
        p.add_argument("object")
        p.add_argument("--draw", default=None, metavar="OUT.png", help="write the image with the results drawn on it")
        _model_args(p), _settings_args(p, objects=True)
        p.set_defaults(fn=cmd_locate)

    p = sub.add_parser("train", help="train a model from scratch (the embedded nano recipe)")
    p.add_argument("recipe", choices=("nano",))
    _train_args(p)
    p.set_defaults(fn=cmd_train)

    sub.add_parser("models", help="list the models available locally").set_defaults(fn=cmd_models)

    p = sub.add_parser("pull", help="download a model from the Hugging Face hub (needs network and huggingface_hub)")
    p.add_argument("repo", help="hub id, e.g. vikhyatk/moondream2")
    p.add_argument("--revision", default=None, help="branch, tag or commit (e.g. 2025-06-21)")
    p.set_defaults(fn=cmd_pull)

    p = sub.add_parser("serve", help="serve the Moondream HTTP API (the official client's endpoint)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default 2020, or the next free port")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    p.add_argument("--allow-file-images", action="store_true", help="read file:// image URLs")
    p.add_argument(
        "--allow-adapter-paths",
        type=Path,
        metavar="DIR",
        help="requests may load adapter files from inside DIR (default: only registered adapters and finetune checkpoints)",
    )
    p.add_argument("--api-key", default=os.environ.get("MOONBASE_API_KEY"), help="require this key (default $MOONBASE_API_KEY)")
    p.add_argument("--max-body-mb", type=float, default=50.0, help="larger request bodies get 413")
    p.add_argument("--max-in-flight", type=int, default=256, help="more concurrent requests get 429")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request before 504")
    p.add_argument("--finetunes", default=DEFAULT_STORE, help="finetune store for /v1/tuning (default %(default)s; none = off)")
    p.add_argument("--root-path", default="", help="the path prefix a reverse proxy serves moonbase under (e.g. /moonbase)")
    ray_flags(p, "deploy as a Ray Serve application (no tuning API)", "--replicas", "model replicas")
    _model_args(p)
    p.set_defaults(fn=cmd_serve)

    add_finetune_parser(sub, _model_args)

    add_batch_parser(sub, _model_args)

    add_eval_parser(sub, _model_args)

    sub.add_parser("bench", help="engine throughput and latency vs the single-request path (see bench --help)")

    p = sub.add_parser("parity", help="check numerical parity against reference golden outputs")
    p.add_argument("directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_parity)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser: python -m moonbase bench == python -m moonbase.bench
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except MoonbaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
