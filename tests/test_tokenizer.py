import pytest

from tinylm.errors import TinyLMError
from tinylm.tokenizer import CharTokenizer, HFTokenizer, build_tokenizer, load_tokenizer


def test_char_round_trip_and_save(tmp_path, shakespeare_text):
    text = shakespeare_text[:20_000]
    tok = CharTokenizer.train(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(text))
    tok.save(tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.encode("ROMEO:") == tok.encode("ROMEO:") and again.vocab_size == tok.vocab_size


def test_char_unknown_characters_are_named():
    tok = CharTokenizer.train("abc")
    with pytest.raises(TinyLMError, match="'z'"):
        tok.encode("abz")


def test_bpe_round_trip_unicode_and_save(tmp_path, shakespeare_text):
    tok = HFTokenizer.train_bpe([shakespeare_text[:50_000]], vocab_size=500)
    assert tok.vocab_size == 500 and tok.eot_id == 0
    sample = "KING HENRY: naïve café — 東京 🙂\n"
    assert tok.decode(tok.encode(sample)) == sample  # byte-level: anything round-trips
    ids = tok.encode(shakespeare_text[:2000])
    assert len(ids) < 2000  # merges compress
    tok.save(tmp_path / "bpe.json")
    again = load_tokenizer(tmp_path / "bpe.json")
    assert again.kind == "bpe" and again.encode(sample) == tok.encode(sample)


def test_unknown_tokenizer_and_corrupt_file(tmp_path):
    with pytest.raises(TinyLMError, match="Unknown tokenizer"):
        build_tokenizer("wordpiece", ["x"])
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(TinyLMError, match="corrupt"):
        load_tokenizer(tmp_path / "bad.json")


def test_gpt2_tokenizer_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        tok = build_tokenizer("gpt2", [])
    except TinyLMError as exc:
        assert "GPT-2" in str(exc) or "transformers" in str(exc)
    else:  # a cached copy exists on this machine: then it must work
        assert tok.decode(tok.encode("Hello world")) == "Hello world"


def test_gpt2_falls_back_to_tiktoken(tmp_path, monkeypatch):
    import sys
    import types

    class Encoding:  # a stand-in with tiktoken's interface (its real BPE file needs a network)
        n_vocab, eot_token = 50257, 50256

        def encode(self, text, allowed_special=()):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    monkeypatch.setitem(sys.modules, "tiktoken", types.SimpleNamespace(get_encoding=lambda name: Encoding()))
    monkeypatch.setattr(
        HFTokenizer, "gpt2", classmethod(lambda cls: (_ for _ in ()).throw(TinyLMError("no transformers")))
    )
    tok = build_tokenizer("gpt2", [])
    assert tok.kind == "gpt2" and tok.vocab_size == 50257 and tok.decode(tok.encode("Hi there")) == "Hi there"
    tok.save(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").encode("ab") == [97, 98]


def test_char_lookup_is_vectorised_and_exact():
    import numpy as np

    from tinylm.tokenizer import encode_arrays

    text = "KING: naïve café — 東京\n" * 3 + "plain ascii text, odd length"
    tok = CharTokenizer.train(text)
    reference = [tok.stoi[c] for c in text]
    assert tok.encode(text) == reference
    for sample in (text[:-1], "a", "", "an", "東京", text[:17]):  # ASCII or not, odd and even lengths
        assert tok.encode(sample) == [tok.stoi[c] for c in sample]
        assert tok.encode_array(sample).dtype == np.uint16
    assert [a.tolist() for a in encode_arrays(tok, [text, "an", text[::-1]])] == [
        tok.encode(text),
        tok.encode("an"),
        tok.encode(text[::-1]),
    ]
    for bad, named in (("KING?", "'?'"), ("café!", "'!'"), ("日本", "'日', '本'"), ("a\ud800", r"'\\ud800'")):
        with pytest.raises(TinyLMError, match=named):
            tok.encode(bad)


def test_char_vocabulary_beyond_16_bits():
    chars = [chr(0x4E00 + i) for i in range(66_000)]
    tok = CharTokenizer(chars)
    ids = tok.encode_array("".join(chars[65_530:65_540]))
    assert ids.dtype.name == "uint32" and ids.tolist() == list(range(65_530, 65_540))


def test_utf8_bytes_encode_as_their_decoded_text_or_not_at_all():
    """encode_utf8 looks characters up on UTF-8 bytes; on random well-formed, damaged and arbitrary bytes it
    gives exactly encode_array(bytes.decode()), or None (the caller then decodes, which says what is wrong)
    whenever Python's decoder refuses them or a character is outside the vocabulary; in the narrowest
    dtype that holds the vocabulary."""
    import random

    import numpy as np

    rng = random.Random(0)
    codes = [
        *range(32, 127),
        10,
        0xE9,
        0x7FF,
        0x800,
        0x2014,
        0xD7FF,
        0xE000,
        0xFFFF,
        0x10000,
        0x1F600,
        0x10FFFF,
    ]
    tok = CharTokenizer(chr(c) for c in codes)
    edges = [
        0x41,
        0x80,
        0x8F,
        0x90,
        0x9F,
        0xA0,
        0xBF,
        0xC0,
        0xC2,
        0xDF,
        0xE0,
        0xED,
        0xEF,
        0xF0,
        0xF4,
        0xF5,
        0xFF,
    ]
    seen = {"equal": 0, "none": 0}
    for _ in range(4000):
        n = rng.randint(0, 10)
        if rng.random() < 0.5:
            raw = bytearray("".join(chr(rng.choice(codes + [0x3B1])) for _ in range(n)).encode())
            if raw and rng.random() < 0.5:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        else:
            raw = bytearray(rng.choice(edges) if rng.random() < 0.7 else rng.randrange(256) for _ in range(n))
        got = tok.encode_utf8(bytes(raw))
        try:
            want = tok.encode_array(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, TinyLMError):  # malformed, or U+03B1 (outside the vocabulary)
            want = None
        if want is None:
            assert got is None, bytes(raw)
        else:
            assert got is not None and got.dtype == np.uint8 and got.tolist() == want.tolist(), bytes(raw)
        seen["none" if got is None else "equal"] += 1
    assert min(seen.values()) > 1000, seen
    wide = CharTokenizer(chr(c) for c in [*codes, *range(0x400, 0x500)])  # 300 characters: uint16 ids
    text = "Ѐ a\U0010ffffӿ"
    assert wide.encode_utf8(text.encode()).dtype == np.uint16
    assert wide.encode_utf8(text.encode()).tolist() == wide.encode(text)
