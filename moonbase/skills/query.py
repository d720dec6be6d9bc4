"""query(image | None, question, reasoning, spatial_refs): an answer, optionally after a grounded
reasoning trace.

Reference quirks reproduced on purpose (spec §9, each a `TokenizerConfig` field so another model can turn
it off): a non-reasoning prompt ends with the answer token twice (`... question 3 3`, D1), because that is
what the code shipped with the 2025-06-21 weights does; the question is encoded as is (no leading space);
spatial refs are embedded only in the first prefill of a reasoning query (the reference re-sends them with
the answer prefill and crashes, D8)."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

from ..config import ModelConfig, TokenizerConfig
from ..errors import SettingsError, TuningError
from ..metrics import exact_match
from ..model import region
from ..tokenizer import Tokenizer
from .base import Prompt, Settings, Skill, SkillRequest, spatial_prompt
from .program import CoordMode, Feed, Head, Output, TextProgram, TextRun
from .training import Grounding, Move, Rollout, Target, coord_value, items, obj, parse_point, text_moves


class QueryProgram:
    """Optionally a reasoning trace (stops at the answer token, coordinates decoded inline), then the answer
    token is fed and the answer generated."""

    decisions: tuple[int, ...] = ()
    allowed: tuple[int, ...] = ()
    samples_regions = limited = False

    def __init__(self, tok: TokenizerConfig, max_tokens: int, reasoning: bool):
        self.tok = tok
        self.answer = TextProgram(tok, (tok.answer_id,), (tok.eos_id,), max_tokens)
        self.trace = TextProgram(tok, (tok.eos_id, tok.size_id), (tok.answer_id,), max_tokens, decode_coords=True)
        self.phase = self.trace if reasoning else self.answer
        self.feed: Feed | None = None
        self.new_tokens: list[int] = []

    @property
    def done(self) -> bool:
        return self.phase is self.answer and self.answer.done

    def head(self) -> Head:
        return Head.LM

    def coord_mode(self) -> CoordMode:
        return self.phase.coord_mode()

    def mask(self) -> tuple[int, ...]:
        return self.phase.mask()

    def on_token(self, token: int, room: int) -> Head | None:
        need = self.phase.on_token(token, room)
        self.feed = self.phase.feed
        self.new_tokens = self.phase.new_tokens if self.phase is self.answer else []
        if self.phase is self.trace and self.trace.done:
            if room <= 1:
                raise SettingsError("the reasoning trace filled the context; lower max_tokens")
            self.phase, self.feed = self.answer, Feed(token=self.tok.answer_id)
        return need

    def on_region(self, value: float | tuple[float, float]) -> None:
        self.phase.on_region(value)
        self.feed = self.phase.feed

    def output(self) -> Output:
        out = self.answer.output()
        out.trace = self.trace.run if self.trace.done else None  # the trace ran (reasoning)
        return out


class Query(Skill):
    name, arg = "query", "question"
    needs_image = False
    takes_spatial_refs = can_reason = True
    text_key = "answer"

    def prompt(self, req: SkillRequest, tokenizer: Tokenizer) -> Prompt:
        """The first prefill: `prefix [spatial] question` + the mode: `thinking` or the suffix, after the suffix
        on Moondream 2 (`... 3 3`, `... 3 4`), alone on Moondream 3 (`... 3`, `... 4`)."""
        tok = tokenizer.cfg
        if not isinstance(req.question, str) or not req.question:
            raise SettingsError("question must be a non-empty string")
        end = (tok.thinking_id,) if req.reasoning else tok.query_suffix
        text = tuple(tokenizer.encode(req.question)) + (tok.query_suffix if tok.repeat_query_suffix else ()) + end
        return Prompt(tok.query_prefix) + spatial_prompt(req.spatial_refs, tok) + Prompt(text)

    def program(self, req: SkillRequest, s: Settings, tok: TokenizerConfig):
        return partial(QueryProgram, tok, s.max_tokens, bool(req.reasoning))

    def render(self, out: Output, tokenizer: Tokenizer, clip: bool = True) -> dict[str, Any]:
        assert out.text is not None
        reasoning = {} if out.trace is None else {"reasoning": reasoning_output(out.trace, tokenizer)}
        return reasoning | {"answer": tokenizer.decode(out.text.ids)}

    def parse_target(self, d: dict[str, Any], where: str) -> Target:
        answer = d.get("answer")
        if not isinstance(answer, str):
            raise TuningError(f"{where}.answer must be a string")
        r = d.get("reasoning")
        if r is None:
            return Target(answer)
        r = obj({"text": r} if isinstance(r, str) else r, f"{where}.reasoning")
        text = r.get("text")
        if not isinstance(text, str):
            raise TuningError(f"{where}.reasoning.text must be a string")
        spans = []
        for k, g in enumerate(items(r, "grounding", f"{where}.reasoning")):
            g = obj(g, f"{where}.reasoning.grounding[{k}]")
            s, e = g.get("start_idx"), g.get("end_idx")
            if not (isinstance(s, int) and isinstance(e, int) and 0 <= s <= e <= len(text)):
                raise TuningError(f"{where}.reasoning.grounding[{k}] needs 0 <= start_idx <= end_idx <= len(text)")
            pts = tuple(parse_point(p, f"{where}.reasoning.grounding[{k}].points") for p in items(g, "points", where))
            spans.append(Grounding(s, e, pts))
        spans.sort(key=lambda g: g.start)
        if any(a.end > b.start for a, b in zip(spans, spans[1:], strict=False)):
            raise TuningError(f"{where}.reasoning.grounding spans overlap")
        return Target(answer, text, tuple(spans))

    def teach(self, req: SkillRequest, target: Target, tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[Prompt, list[Move]]:
        """The answer; with a reasoning target the trace first (ended by the answer token), its grounded spans
        written as `<start_ground_points> span coord coord ... <end_ground>`, each coordinate decoded from the
        hidden state that produced its coord token, as inference does (the order of text and coordinates
        inside a span is our decision; `reasoning_output` parses it back to the same text and grounding)."""
        tok = cfg.tokenizer
        if target.answer is None:
            raise TuningError("a query target needs an answer")
        moves: list[Move] = []
        if req.reasoning or target.reasoning is not None:
            req = replace(req, reasoning=True)
            trace = [(t, None if c is None else region.coord_to_bin(c, cfg.region)) for t, c in trace_tokens(target, tokenizer)]
            moves = _trace_moves(trace, True, cfg)
        answer = text_moves(tokenizer.encode(target.answer), (tok.answer_id,), tok.eos_id, target.about)
        return self.prompt(req, tokenizer), moves + answer

    def replay(self, req: SkillRequest, r: Rollout, tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[Prompt, list[Move]]:
        tok = cfg.tokenizer
        moves: list[Move] = []
        # the trace's tokens that were fed back: all but the last of a trace a limit cut
        fed = len(r.thinking_tokens) - (0 if r.has_answer_separator else 1) if req.reasoning else 0
        coord_tokens = r.thinking_tokens[:fed].count(tok.coord_id)
        if coord_tokens > len(r.coords):
            raise TuningError("rollout: the trace has more coord tokens than coords")
        if coord_tokens < len(r.coords):
            raise TuningError("rollout: more coords than coord tokens in the trace")
        if req.reasoning:
            bins = iter(r.coords)
            trace = [(t, next(bins) if t == tok.coord_id and j < fed else None) for j, t in enumerate(r.thinking_tokens)]
            moves = _trace_moves(trace, r.has_answer_separator, cfg)
        stop = tok.eos_id if r.finish_reason == "stop" else None
        return self.prompt(req, tokenizer), moves + text_moves(r.answer_tokens, (tok.answer_id,), stop)

    def check_rollout(self, r: Rollout, where: str) -> None:
        if r.sizes:
            raise TuningError(f"{where}: a query rollout has no sizes")

    def reward(self, output: dict[str, Any], truth: Target) -> float:
        """Exact match after normalization (lowercase, no punctuation, single spaces)."""
        if truth.answer is None:
            raise TuningError("query ground truth needs an answer")
        return float(exact_match(output.get("answer", ""), truth.answer))


def trace_tokens(target: Target, tokenizer: Tokenizer) -> list[tuple[int, float | None]]:
    """A reasoning text with grounding spans -> (token id, coordinate fed in its place or None)."""
    tok, encode = tokenizer.cfg, tokenizer.encode
    out: list[tuple[int, float | None]] = []
    text, at = target.reasoning or "", 0
    for g in target.grounding:
        out += [(t, None) for t in encode(text[at : g.start])] if g.start > at else []
        out += [(tok.start_ground_points_id, None)] + [(t, None) for t in encode(text[g.start : g.end])]
        out += [(tok.coord_id, v) for point in g.points for v in point]
        out.append((tok.end_ground_id, None))
        at = g.end
    return out + ([(t, None) for t in encode(text[at:])] if at < len(text) else [])


def _trace_moves(trace: list[tuple[int, int | None]], separator: bool, cfg: ModelConfig) -> list[Move]:
    """A reasoning trace of (token, coordinate bin or None), then the answer token: chosen when the trace
    ended by itself (`separator`), else fed after the trace's last token, which a limit left unfed."""
    tok, mask = cfg.tokenizer, (cfg.tokenizer.eos_id, cfg.tokenizer.size_id)
    moves: list[Move] = []
    for j, (t, b) in enumerate(trace):
        masked = mask if j else ()
        if j == len(trace) - 1 and not separator:
            moves.append(Move(Head.LM, t, None, masked))
        elif b is None:
            moves.append(Move(Head.LM, t, Feed(token=t), masked))
        else:  # the coordinate is read from the hidden state that chose the coord token, greedily
            moves += [Move(Head.LM, t, None, masked), Move(Head.COORD, b, Feed(coord=coord_value(b, cfg.region)), action=False)]
    answer = Feed(token=tok.answer_id)
    moves.append(Move(Head.LM, tok.answer_id, answer, mask if trace else ()) if separator else Move(Head.LM, None, answer))
    return moves


def reasoning_output(run: TextRun, tokenizer: Tokenizer) -> dict[str, Any]:
    """A reasoning trace -> {"text", "grounding"}: grounding ids open a new chunk, chunks are decoded separately,
    and a chunk with at least one (x, y) pair is a grounding span (its character offsets and points)."""
    tok = tokenizer.cfg
    chunks: list[tuple[list[int], list[float]]] = [([], [])]
    for i, t in enumerate(run.ids):
        if t in (tok.start_ground_points_id, tok.end_ground_id):
            chunks.append(([], []))
        chunks[-1][0].append(t)
        if i in run.coords:
            chunks[-1][1].append(run.coords[i])
    text, grounding = "", []
    for ids, coords in chunks:
        piece = tokenizer.decode(ids)
        if len(coords) >= 2:
            points = [[coords[i], coords[i + 1]] for i in range(0, len(coords) - 1, 2)]
            grounding.append({"start_idx": len(text), "end_idx": len(text) + len(piece), "points": points})
        text += piece
    return {"text": text, "grounding": grounding}
