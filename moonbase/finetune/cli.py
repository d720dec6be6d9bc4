"""`moonbase finetune sft | rl | export | import | list`: LoRA fine-tuning from JSONL, in this process, through the
service and into the store (`--store`) that the HTTP tuning API uses; PEFT export and import. Usage and the
held-out evaluation: docs/finetuning.md ("Command line").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_STORE = "~/.cache/moonbase/finetunes"


def add_parser(sub, model_args) -> None:
    p = sub.add_parser("finetune", help="fine-tune a LoRA adapter (SFT or RL), export / import PEFT adapters")
    fsub = p.add_subparsers(dest="finetune_command", required=True)
    for mode in ("sft", "rl"):
        q = fsub.add_parser(mode, help=f"{'supervised' if mode == 'sft' else 'reinforcement (GRPO)'} fine-tuning from JSONL")
        q.add_argument("data", nargs="?", help="JSONL file (see docs/finetuning.md for the row format)")
        q.add_argument("--coco", metavar="instances.json", help="COCO detection annotations as detect data (with --images)")
        q.add_argument("--images", metavar="DIR", help="the folder of the images the COCO annotations name")
        q.add_argument("--name", default=None, help="finetune name (default: the data file's stem); an existing one resumes")
        q.add_argument("--rank", type=int, default=16, choices=(8, 16, 24, 32))
        q.add_argument("--steps", type=int, default=None, help="train steps (default: one epoch)")
        q.add_argument("--batch", type=int, default=8, help="examples (groups) per step")
        q.add_argument(
            "--lr", type=float, default=None, help=f"default {2e-3 if mode == 'sft' else 1e-3:g} (LoRA), 1e-5 (--full)"
        )
        q.add_argument("--held-out", type=float, default=0.1, help="fraction (< 1) or count of examples held out for eval")
        q.add_argument("--targets", default="qkv,proj,fc1,fc2", help="LoRA targets (qkv,fc1,fc2 export exactly to PEFT)")
        q.add_argument("--train-region", action="store_true", help="also train the region decoders (detect/point)")
        q.add_argument("--train-vision", action="store_true", help="also train the vision encoder")
        q.add_argument("--seed", type=int, default=0)
        if mode == "sft":
            g = q.add_argument_group("full fine-tuning", "the model's own weights instead of a LoRA (docs/finetuning.md)")
            g.add_argument("--full", action="store_true", help="train the whole text model (and region head for detect/point)")
            g.add_argument("--region-only", action="store_true", help="train only the region encoders/decoders (coord/size loss)")
            g.add_argument(
                "--out", metavar="DIR", help="run directory: checkpoint.pt, train_log.jsonl, model/ (default runs/NAME)"
            )
            g.add_argument("--grad-accum", type=int, default=1, help="micro-batches of --batch examples per step")
            g.add_argument("--epochs", type=int, default=1, help="passes over the data when --steps is not given")
        if mode == "rl":
            q.add_argument("--reward", help="module:function scoring fn(row, output) -> float (default: ground truth)")
            q.add_argument("--rollouts", type=int, default=8, help="rollouts per example")
            q.add_argument("--temperature", type=float, default=1.0)
            q.add_argument("--kl", type=float, default=0.0, help="KL-to-base coefficient")
        model_args(q)
        q.set_defaults(fn=cmd_train, mode=mode)
    q = fsub.add_parser("export", help="write a checkpoint as a PEFT adapter directory")
    q.add_argument("checkpoint", help="FINETUNE_ID@STEP (or FINETUNE_ID for its latest checkpoint)")
    q.add_argument("--peft", required=True, metavar="DIR")
    q.set_defaults(fn=cmd_export)
    q = fsub.add_parser("import", help="import a PEFT LoRA adapter as a finetune (checkpoint at step 0)")
    q.add_argument("directory")
    q.add_argument("--name", required=True)
    model_args(q)
    q.set_defaults(fn=cmd_import)
    q = fsub.add_parser("list", help="finetunes and their checkpoints")
    q.set_defaults(fn=cmd_list)
    for q in fsub.choices.values():  # every finetune command works on a store
        q.add_argument("--store", default=DEFAULT_STORE)


def _service(a: argparse.Namespace):
    from ..cli import vl_from_args
    from .service import TuningService
    from .store import FinetuneStore

    model = vl_from_args(a)
    return TuningService(model, FinetuneStore(a.store), model.model.name)


def cmd_train(a: argparse.Namespace) -> int:
    from ..errors import TuningError
    from .data import load_coco, load_jsonl
    from .rewards import load_reward
    from .run import RunConfig, fine_tune

    if (a.data is None) == (a.coco is None) or (a.coco is not None) != (a.images is not None):
        raise TuningError("give a JSONL data file, or --coco instances.json with --images DIR")
    examples = load_jsonl(a.data) if a.data else load_coco(a.coco, a.images)
    name = a.name or Path(a.data or a.coco).stem
    if getattr(a, "full", False) or getattr(a, "region_only", False):
        return _train_full(a, examples, name)
    a.lr = a.lr if a.lr is not None else (2e-3 if a.mode == "sft" else 1e-3)
    reward = load_reward(a.reward) if getattr(a, "reward", None) else None
    options = {"targets": a.targets.split(","), "train_region": a.train_region, "train_vision": a.train_vision}
    rl = {"rollouts": a.rollouts, "temperature": a.temperature, "kl_coef": a.kl} if a.mode == "rl" else {}
    cfg = RunConfig(a.mode, a.rank, a.steps, a.batch, a.lr, a.held_out, options=tuple(options.items()), seed=a.seed, **rl)
    print(json.dumps(fine_tune(_service(a), name, examples, cfg, reward)))
    return 0


def _train_full(a: argparse.Namespace, examples, name: str) -> int:
    from ..cli import vl_from_args
    from ..errors import TuningError
    from .full import FullConfig, Scope, fine_tune_full

    if a.full and a.region_only:
        raise TuningError("--full and --region-only are two different runs: give one")
    scope = Scope.REGION_ONLY if a.region_only else Scope.FULL
    train_region = True if a.train_region else None
    cfg = FullConfig(scope, a.steps, a.epochs, a.batch, a.grad_accum, a.lr or 1e-5, train_vision=a.train_vision,
                     train_region=train_region, seed=a.seed)  # fmt: skip
    model = fine_tune_full(vl_from_args(a).model, examples, a.out or Path("runs") / name, cfg)
    print(json.dumps({"model": str(model), "examples": len(examples), "scope": scope.value}))
    return 0


def _checkpoint(svc_store, ref: str) -> tuple[str, int]:
    from ..errors import FinetuneNotFoundError
    from .steps import int_of

    fid, _, step = ref.partition("@")
    if step:
        return fid, int_of(step, "step")
    saved = svc_store.checkpoints(fid)
    if not saved:
        raise FinetuneNotFoundError(f"finetune {fid} has no checkpoints")
    return fid, saved[-1]["step"]


def cmd_export(a: argparse.Namespace) -> int:
    from .lora import LoraConfig, export_peft
    from .store import FinetuneStore

    store = FinetuneStore(a.store)
    fid, step = _checkpoint(store, a.checkpoint)
    state = store.load_checkpoint(fid, step)
    cfg = LoraConfig.from_dict(state["lora_config"])
    if cfg.train_region or cfg.train_vision:
        print("note: PEFT holds only the text LoRA; the trained region/vision weights stay in the checkpoint", file=sys.stderr)
    path = export_peft(state["lora_state_dict"], cfg, Path(a.peft), state.get("base_model", "moondream"))
    print(json.dumps({"checkpoint": f"{fid}@{step}", "peft": str(path)}))
    return 0


def cmd_import(a: argparse.Namespace) -> int:
    from .lora import import_peft

    state, cfg = import_peft(Path(a.directory))
    svc = _service(a)
    fid = svc.import_adapter(a.name, state, cfg)
    print(json.dumps({"finetune_id": fid, "model": f"{svc.base_name}/{fid}@0"}))
    return 0


def cmd_list(a: argparse.Namespace) -> int:
    from .store import FinetuneStore

    store = FinetuneStore(a.store)
    for info in store.list():
        steps = [c["step"] for c in store.checkpoints(info.finetune_id)]
        print(f"{info.finetune_id}  {info.name:<24} rank {info.rank:<3} base {info.base_model:<12} checkpoints {steps}")
    return 0
