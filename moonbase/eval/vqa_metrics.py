"""The standard VQA metrics, as their benchmarks define them (not as any one script happens to round them):

* ChartQA relaxed accuracy (Methani et al. 2020, as pix2struct scores it): when both the answer and the
  target read as numbers (a trailing `%` divides by 100) and the target is not zero, the answer may be off by
  5% of the target; otherwise the two must match exactly, case-insensitively.
* DocVQA ANLS (Biten et al. 2019): per question, the best over the accepted answers of 1 - NL, where NL is the
  Levenshtein distance over the longer length (case-insensitive, stripped), and 0 once NL reaches tau = 0.5.
* TextVQA / VQA v2 score (Antol et al. 2015): answers normalized as the official evaluation does
  (punctuation, number words, articles, common contractions); min(1, matching humans / 3), averaged over
  the ten leave-one-out subsets of the ten human answers.
* Exact match (CountBenchQA): stripped and lowercased strings are equal."""

from __future__ import annotations

import re

from ..errors import SettingsError

ANLS_TAU = 0.5
RELAXED_TOLERANCE = 0.05


def _number(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = RELAXED_TOLERANCE) -> float:
    p, t = _number(prediction), _number(target)
    if p is not None and t:  # a zero target has no relative error: it falls through to exact match
        return float(abs(p - t) / abs(t) <= tolerance)
    return exact_match(prediction, target)


def anls(prediction: str, answers: list[str], tau: float = ANLS_TAU) -> float:
    try:
        from rapidfuzz.distance import Levenshtein
    except ImportError as e:
        raise SettingsError("ANLS needs rapidfuzz: pip install 'moonbase[eval]'") from e
    best = 0.0
    p = prediction.strip().lower()
    for answer in answers:
        a = answer.strip().lower()
        longest = max(len(p), len(a))
        nl = Levenshtein.distance(p, a) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < tau else 0.0)
    return best


def exact_match(prediction: str, target: str) -> float:
    return float(prediction.strip().lower() == target.strip().lower())


# --- the VQA answer normalization ------------------------------------------------------------------

NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {  # the official list maps the apostrophe-less spellings back; the common ones
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's", "im": "i'm",
    "isnt": "isn't", "itll": "it'll", "ive": "i've", "lets": "let's", "shouldnt": "shouldn't", "thats": "that's",
    "theres": "there's", "theyre": "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "wont": "won't", "wouldnt": "wouldn't", "youre": "you're", "youve": "you've",
}  # fmt: skip
PUNCTUATION = set(';/[]"{}()=+\\_-><@`,?!')  # the official list; "." and "'" are handled apart
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit (3.5 keeps its own)
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out, glued = text, _COMMA_NUMBER.search(text) is not None
    for c in PUNCTUATION:  # next to a space (or in a text with 1,000-style numbers) it goes; inside a word it splits
        out = out.replace(c, "" if (c + " " in text or " " + c in text or glued) else " ")
    words = [NUMBER_WORDS.get(w, w) for w in _PERIOD.sub("", out).lower().split() if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_score(prediction: str, human_answers: list[str]) -> float:
    """Mean over the leave-one-out subsets of min(1, humans in the subset who gave the prediction / 3)."""
    if not human_answers:
        raise ValueError("a VQA score needs the human answers")
    p = normalize_answer(prediction)
    humans = [normalize_answer(a) for a in human_answers]
    scores = []
    for i in range(len(humans)):
        others = humans[:i] + humans[i + 1 :]
        scores.append(min(1.0, sum(h == p for h in others) / 3))
    return sum(scores) / len(scores)
