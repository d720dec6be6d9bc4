"""caption(image, length): a description of the image, short, normal or long."""

from __future__ import annotations

from functools import partial
from typing import Any

from ..config import ModelConfig, TokenizerConfig
from ..errors import SettingsError
from ..tokenizer import Tokenizer
from .base import Prompt, Settings, Skill, SkillRequest
from .program import Output, TextProgram
from .training import Move, Target, text_moves


class Caption(Skill):
    name, arg = "caption", "length"
    text_key = "caption"
    tunable = False  # the tuning API trains query, point, detect and segment

    def prompt(self, req: SkillRequest, tokenizer: Tokenizer) -> Prompt:
        templates = tokenizer.cfg.caption
        if req.length not in templates:
            raise SettingsError(f"length must be one of {', '.join(templates)}, got {req.length!r}")
        return Prompt(templates[req.length])

    def program(self, req: SkillRequest, s: Settings, tok: TokenizerConfig):
        return partial(TextProgram, tok, (tok.answer_id,), (tok.eos_id,), s.max_tokens)

    def render(self, out: Output, tokenizer: Tokenizer, clip: bool = True) -> dict[str, Any]:
        assert out.text is not None
        return {"caption": tokenizer.decode(out.text.ids)}

    def teach(self, req: SkillRequest, target: Target, tokenizer: Tokenizer, cfg: ModelConfig) -> tuple[Prompt, list[Move]]:
        tok = cfg.tokenizer
        moves = text_moves(tokenizer.encode(target.answer or ""), (tok.answer_id,), tok.eos_id, target.about)
        return self.prompt(req, tokenizer), moves
