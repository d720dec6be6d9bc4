"""Tokenizer wrapper (HF `tokenizers` JSON) and the streaming detokenizer the skills share."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .config import TokenizerConfig
from .errors import CheckpointError


class Tokenizer:
    def __init__(self, tok: HFTokenizer, cfg: TokenizerConfig, source: str = "<memory>"):
        self._tok, self.cfg = tok, cfg
        eos = tok.id_to_token(cfg.eos_id)
        special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
        if eos is None or eos not in special:
            raise CheckpointError(
                f"{source}: token id {cfg.eos_id} is {eos!r}, not a special token, so this tokenizer does not have the "
                "layout the model's templates expect (special ids 0-9 as in moondream/starmie-v1). The Hugging Face "
                "moondream2 repo ships a stale GPT-2 tokenizer.json; use the starmie-v1 tokenizer.json instead."
            )

    @classmethod
    def from_file(cls, path: str | Path, cfg: TokenizerConfig) -> Tokenizer:
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(f"cannot read tokenizer {path}: {e}") from e
        return cls(tok, cfg, str(path))

    @property
    def size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Special ids and ids the tokenizer does not know are dropped, as in the reference."""
        return self._tok.decode(ids, skip_special_tokens=True)

    def to_str(self) -> str:
        return self._tok.to_str()


# scripts written without spaces: CJK ideographs (with extensions and compatibility forms), kana, hangul
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
CJK_RANGES += ((0x3040, 0x30FF), (0xAC00, 0xD7AF))


class TextStream:
    """Incremental detokenizer: text is released only up to the last space (or at a newline or CJK character),
    so a multi-byte character split across tokens is never emitted half-decoded. The concatenation of all
    pieces equals `decode(all ids)`."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        cjk = bool(text) and any(lo <= ord(text[-1]) <= hi for lo, hi in CJK_RANGES)
        end = len(text) if cjk or text.endswith("\n") else text.rfind(" ")
        if end <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted : end], end
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


SPECIAL_TOKENS = ["<|endoftext|>"] + [f"<|md_reserved_{i}|>" for i in range(9)]  # ids 0-9, starmie layout
# Task words of the prompt templates, as single special tokens (starmie uses ordinary word ids instead).
TASK_TOKENS = ["<|caption|>", "<|short|>", "<|normal|>", "<|long|>", "<|query|>", "<|detect|>", "<|point|>"]


SEGMENT_TOKEN = "<|segment|>"  # a tokenizer that has it gets a segment template (nano trained to segment)


def add_path_numbers(tok: HFTokenizer, step: int = 30) -> HFTokenizer:
    """Segment path numbers as single tokens (" 0", " 30", ... " 960"), matched before any digit split: Moondream
    3 reads a path one token at a time, and a tokenizer that splits digits (nano's) could not write 480 in one.
    `Segment.teach` snaps a target's numbers to the nearest one the tokenizer has."""
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(f" {v}", normalized=False) for v in range(0, 961, step)])
    return tok


def task_token_templates(tok: HFTokenizer) -> TokenizerConfig:
    """Templates of the MD2 shape (`<md0> task <md1> ... <md2>`) over a tokenizer that has TASK_TOKENS (and a
    segment template when it has SEGMENT_TOKEN)."""
    t = {name: tok.token_to_id(name) for name in TASK_TOKENS}
    missing = [name for name, i in t.items() if i is None]
    if missing:
        raise CheckpointError(f"tokenizer lacks the task tokens {missing}")
    segment = tok.token_to_id(SEGMENT_TOKEN)
    return TokenizerConfig(
        caption={k: (1, t["<|caption|>"], 2, t[f"<|{k}|>"], 3) for k in ("short", "normal", "long")},
        query_prefix=(1, t["<|query|>"], 2),
        detect_prefix=(1, t["<|detect|>"], 2),
        point_prefix=(1, t["<|point|>"], 2),
        segment_prefix=() if segment is None else (1, segment, 2),
        segment_suffix=() if segment is None else (3,),
    )


def byte_level_tokenizer(extra_special: list[str] = ()) -> HFTokenizer:
    """A byte-level BPE with no merges: ids 0-9 are the starmie special tokens, then the 256 bytes, then
    `extra_special`. Enough to run every code path of a model without a trained vocabulary."""
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *sorted(pre_tokenizers.ByteLevel.alphabet()), *extra_special])}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS + list(extra_special))
    return tok
