"""Language about shape scenes: captions at three lengths, questions with exact answers, detect/point targets."""

from __future__ import annotations

import itertools
import random

import numpy as np

from .shapes import COLORS, SHAPES, Scene, Shape, outline_in, render_scene
from .tasks import Example, Task, canonical

NUMBERS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _region(s: Shape) -> str:
    row = "top" if s.cy < 1 / 3 else "bottom" if s.cy > 2 / 3 else "middle"
    col = "left" if s.cx < 1 / 3 else "right" if s.cx > 2 / 3 else "center"
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _listing(shapes: tuple[Shape, ...]) -> str:
    names = [f"{article(s.label)} {s.label}" for s in shapes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def captions(scene: Scene) -> dict[str, str]:
    shapes = tuple(sorted(scene.shapes, key=lambda s: s.cx))
    n = len(shapes)
    noun = "shape" if n == 1 else "shapes"
    short = f"{NUMBERS[n].capitalize()} {noun} on a {scene.background} background."
    normal = f"{article(scene.background).capitalize()} {scene.background} background with {_listing(shapes)}."
    long = normal + "".join(f" The {s.label} is in the {_region(s)}." for s in shapes)
    return {"short": short, "normal": normal, "long": long}


# how object phrases are drawn: a shape in the scene ("red circle"), a kind ("star"), a colour alone ("blue
# shape"), or a random colour and kind (often matching nothing); the held-out eval always uses this mix
PHRASE_MIX = (0.45, 0.25, 0.15, 0.15)


def _phrases(scene: Scene, rng: random.Random, mix: tuple[float, ...], present: float = 0.0) -> tuple[str, list[Shape]]:
    """An object phrase and the shapes it refers to (possibly none). A kind or a colour alone is taken from the
    scene's own shapes with probability `present` (those phrases are the ones with several matches)."""
    mode = rng.random() * sum(mix)
    label, kind, colour, _ = itertools.accumulate(mix)

    def from_scene() -> Shape | None:  # draws nothing at present == 0: the held-out streams do not move
        return rng.choice(scene.shapes) if present > 0 and scene.shapes and rng.random() < present else None

    if mode < label and scene.shapes:
        phrase = rng.choice(scene.shapes).label
    elif mode < kind:
        phrase = hit.kind if (hit := from_scene()) else rng.choice(SHAPES)
    elif mode < colour:
        phrase = f"{hit.color if (hit := from_scene()) else rng.choice(list(COLORS))} shape"
    else:
        phrase = f"{rng.choice(list(COLORS))} {rng.choice(SHAPES)}"  # often matches nothing
    return phrase, [s for s in scene.shapes if matches(s, phrase)]


def _segment_phrases(scene: Scene, rng: random.Random, n: int) -> list[tuple[str, Shape]]:
    """`n` shapes that one phrase names alone, each with one such phrase drawn from its label, its kind and
    "<colour> shape" (segment outlines one object: the phrase must pick out exactly one)."""
    named = [
        (s, [p for p in (s.label, s.kind, f"{s.color} shape") if sum(matches(o, p) for o in scene.shapes) == 1])
        for s in scene.shapes
    ]
    named = [(s, phrases) for s, phrases in named if phrases]
    return [(rng.choice(phrases), s) for s, phrases in rng.sample(named, min(n, len(named)))]


def matches(s: Shape, phrase: str) -> bool:
    words = phrase.split()
    if words[-1] == "shape":
        return len(words) == 1 or s.color == words[0]
    return s.kind == words[-1] and (len(words) == 1 or s.color == words[0])


def _count_question(scene: Scene, rng: random.Random, mix: tuple[float, ...], present: float = 0.0) -> Task:
    phrase, hits = _phrases(scene, rng, mix, present)
    words = phrase.split()
    noun = " ".join(words[:-1] + [words[-1] + "s"])  # plural
    return Task("query", f"How many {noun} are there?", str(len(hits)), kind="count", grounding=tuple(s.box for s in hits))


def _extreme(scene: Scene, rng: random.Random) -> Task | None:
    which = rng.choice(["leftmost", "rightmost", "topmost", "bottommost", "largest", "smallest"])
    key = {
        "leftmost": lambda s: -s.cx,
        "rightmost": lambda s: s.cx,
        "topmost": lambda s: -s.cy,
        "bottommost": lambda s: s.cy,
        "largest": lambda s: s.w * s.h,
        "smallest": lambda s: -s.w * s.h,
    }[which]
    ranked = sorted(scene.shapes, key=key, reverse=True)
    if len(ranked) < 2:
        return None
    margin = 0.15 if which in ("largest", "smallest") else 0.05
    a, b = key(ranked[0]), key(ranked[1])
    if abs(a - b) < margin * (abs(a) if which in ("largest", "smallest") else 1):
        return None  # no clear answer
    return Task("query", f"Which shape is the {which}?", ranked[0].label, kind="qa", grounding=(ranked[0].box,))


def _attribute(scene: Scene, rng: random.Random) -> Task | None:
    s = rng.choice(scene.shapes)
    same_kind = [o for o in scene.shapes if o.kind == s.kind]
    same_color = [o for o in scene.shapes if o.color == s.color]
    if rng.random() < 0.5 and len(same_kind) == 1:
        return Task("query", f"What color is the {s.kind}?", s.color, kind="qa", grounding=(s.box,))
    if len(same_color) == 1:
        return Task("query", f"What shape is the {s.color} object?", s.kind, kind="qa", grounding=(s.box,))
    return None


def _exists(scene: Scene, rng: random.Random) -> Task:
    in_scene = rng.random() < 0.5 and scene.shapes
    label = rng.choice(scene.shapes).label if in_scene else f"{rng.choice(list(COLORS))} {rng.choice(SHAPES)}"
    hits = tuple(s.box for s in scene.shapes if s.label == label)
    return Task("query", f"Is there {article(label)} {label}?", "yes" if hits else "no", kind="qa", grounding=hits)


# drill counts name a kind or a colour of the scene's own shapes: those phrases have the most matches, so the
# answers reach past one (zero is taught by every scene's main count question)
DRILL_COUNT_MIX = (0.0, 0.5, 0.5, 0.0)


def _drills(scene: Scene, rng: random.Random, n: int) -> list[Task]:
    """`n` extra questions of the kinds a single question per scene teaches too rarely: which shape is the most
    extreme (a clear answer exists in about half the scenes) and counts of more than one, alternately."""
    extreme = lambda: next((q for q in (_extreme(scene, rng) for _ in range(3)) if q is not None), None)  # noqa: E731
    questions = [extreme() if i % 2 == 0 else _count_question(scene, rng, DRILL_COUNT_MIX, present=1.0) for i in range(n)]
    return [q for q in questions if q is not None]


def scene_example(
    seed: int,
    max_objects: int = 8,
    locate_tasks: int = 4,
    phrase_mix: tuple[float, ...] = PHRASE_MIX,
    drills: int = 0,
    segment_tasks: int = 0,
) -> Example:
    """A scene with a count question, one other question, a caption (half the time), `locate_tasks` detect/point
    tasks, alternating, `drills` extra questions (training only, see `_drills`) and `segment_tasks` outlines of
    shapes whose label is unique in the scene; `phrase_mix` weighs the kinds of object phrase (see PHRASE_MIX)."""
    rng = random.Random(f"scene-tasks-{seed}")  # independent of the stream that drew the scene
    scene = render_scene(seed, max_objects=max_objects)
    caps = captions(scene)
    length = rng.choice(["short", "normal", "long"])
    tasks = [_count_question(scene, rng, phrase_mix)]
    if rng.random() < 0.5:
        tasks.insert(0, Task("caption", length, caps[length], kind="caption"))
    makers = rng.sample([_extreme, _attribute, _exists], 3)
    question = next((q for q in (make(scene, rng) for make in makers) if q is not None), None)  # the first that has one
    if question is not None:
        tasks.append(question)
    for skill in ("detect", "point") * (locate_tasks // 2) + ("detect",) * (locate_tasks % 2):
        phrase, hits = _phrases(scene, rng, phrase_mix)
        tasks.append(Task(skill, phrase, boxes=canonical([s.box for s in hits]), kind=skill))
    tasks += _drills(scene, rng, drills)  # drawn last: streams without drills are unchanged
    for phrase, s in _segment_phrases(scene, rng, segment_tasks):  # after the drills, for the same reason
        tasks.append(Task("segment", phrase, outline_in(s.kind, s.box), boxes=(s.box,), kind="segment"))
    regions = tuple((SHAPES.index(s.kind), list(COLORS).index(s.color), s.box) for s in scene.shapes)
    return Example(np.asarray(scene.image), tuple(tasks), "shapes", regions)
