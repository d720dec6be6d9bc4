"""The knobs of the nano recipe; free of torch, so that `moonbase train` builds its flags from them cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def flag(default: Any, help: str, **argparse_kw: Any) -> Any:
    """A field that `moonbase train nano` exposes as --NAME (help, and any other argparse keywords, in its metadata)."""
    return field(default=default, metadata={"help": help, **argparse_kw})


@dataclass(frozen=True)
class TrainArgs:
    out: str = flag("runs/nano", "run directory")
    steps: int = flag(2600, "steps of the full model, after the vision ones")
    batch_images: int = flag(16, "images (packed rows) per step of the full model")
    lr: float = flag(1e-3, "peak learning rate of the full model")
    # a longer warm-up let the segment recipe ground where 100 steps did not (MODEL_CARD: "Segment tasks")
    warmup: int = flag(400, "warm-up steps of the full model's learning rate")
    weight_decay: float = 0.05
    label_sigma: tuple[float, float] = (8.0, 1.5)  # soft bin labels, annealed linearly from first to second
    attn_weight: float = 1.0  # grounding attention supervision
    # a linear probe on the image tokens predicts the kind and colour under each one (training only).
    # A stronger probe buys qa at the cost of detect; at 0.3 nothing is lost (MODEL_CARD: "The image-token probe")
    probe_weight: float = flag(0.3, "image-token probe loss weight; 0 turns the probe off")
    # vision pre-training: this many steps of `vision_batch` scenes train only the vision side, through the probe,
    # before the `steps` of the full model (see `vision_losses`; MODEL_CARD: "Vision pre-training")
    vision_steps: int = flag(800, "steps that pre-train the vision side alone, first; 0: none")
    # reading position keeps the vision phase from washing it out of the tokens (without it detect fell; MODEL_CARD:
    # "Vision pre-training")
    probe_position: bool = flag(True, "the probe also reads each image token's own grid row and column")
    vision_batch: int = 32
    vision_lr: float = 2e-3
    # more did not help (MODEL_CARD: "Ablations")
    locate_tasks: int = flag(8, "detect/point tasks per shape scene")
    # scenes._drills: an extremes question and a count over a kind or colour of the scene's own shapes, which one
    # question per scene asks too rarely (MODEL_CARD: "Drill questions")
    drills: int = flag(2, "extra extremes and count questions per shape scene; 0: none")
    # >0 also gives a new tokenizer the segment token and the path numbers (train/nano.py: build_tokenizer)
    segment_tasks: int = flag(1, "segment tasks (outlines of shapes one phrase names alone) per shape scene; 0: none")
    # in the order of scenes.PHRASE_MIX: more colour-only and kind-only phrases than the eval stream, which finding a
    # shape by colour alone needed (MODEL_CARD: "Colour-only phrases")
    phrase_mix: tuple[float, ...] = flag(
        (0.30, 0.30, 0.25, 0.15),
        "weights of the object phrases in training (the eval draws 0.45 0.25 0.15 0.15): a shape in the scene, a kind "
        "alone, a colour alone, a random colour and kind",
        type=float,
        nargs=4,
        metavar=("SCENE", "KIND", "COLOUR", "RANDOM"),
    )
    # main steps only: scenes hold at most 3 shapes at first, one more every `curriculum * steps / 6` steps, so 8 from
    # 5/6 of this fraction on (main step 867 of 2600 at 0.4, a third of the way); 0: up to 8 from the start
    curriculum: float = 0.4
    seed: int = flag(0, "seed of the data stream, the tokenizer and the initial weights")
    checkpoint_every: int = 200
    # the budget is an hour on a 2-core CPU; None: no cap
    max_minutes: float | None = flag(59.0, "stop (and save) after this many minutes of training; 0: no cap")
    device: str | None = flag(None, "cpu, cuda, cuda:1 ... (default: cuda when available)")
    resume: bool = flag(False, "continue from OUT/checkpoint.pt")
    model: str = "nano"  # "tiny": the few-layer test config with a byte-level tokenizer (for tests and smoke runs)
    workers: int = flag(0, "data-rendering processes; 0: one background thread, right for a 2-core CPU")

    def __post_init__(self) -> None:
        if len(self.phrase_mix) != 4 or min(self.phrase_mix) < 0 or sum(self.phrase_mix) <= 0:
            raise ValueError(f"phrase_mix needs 4 non-negative weights with a positive sum, got {self.phrase_mix}")
