import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from moonbase.config import TokenizerConfig
from moonbase.errors import CheckpointError
from moonbase.tokenizer import TextStream, Tokenizer, byte_level_tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(byte_level_tokenizer(), TokenizerConfig())


def _stream(tok, text):
    s = TextStream(tok)
    pieces = [s.push(i) for i in tok.encode(text)]
    return pieces, s.flush()


def test_stream_releases_text_up_to_the_last_space(tok):
    pieces, tail = _stream(tok, "a cat sat")
    assert "".join(pieces) + tail == "a cat sat"
    assert [p for p in pieces if p] == ["a", " cat"] and tail == " sat"


def test_stream_never_emits_half_a_character(tok):
    pieces, tail = _stream(tok, "café au lait ü")
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + tail == "café au lait ü"


def test_stream_flushes_on_newline_and_cjk(tok):
    s = TextStream(tok)
    out = "".join(s.push(i) for i in tok.encode("line one\n"))
    assert out == "line one\n"
    s = TextStream(tok)
    assert "".join(s.push(i) for i in tok.encode("猫")) == "猫"


def test_special_ids_are_dropped_in_decode(tok):
    assert tok.decode([0, 3] + tok.encode("hi") + [9, 99999]) == "hi"


def test_gpt2_style_tokenizer_is_rejected():
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer, hf.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    with pytest.raises(CheckpointError, match="stale GPT-2 tokenizer"):
        Tokenizer(hf, TokenizerConfig())
