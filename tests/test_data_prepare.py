"""tinylm prepare at any scale: readers, document splits, safe cuts, shards, atomic output and resumes."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash

import tinylm.data.encoding as encoding
import tinylm.data.sources as sources
from tinylm.cli import main
from tinylm.data import ShardedTokens, TokenData, prepare, token_batches
from tinylm.data.encoding import next_safe_cut, safe_cut
from tinylm.data.splits import HeldOut
from tinylm.errors import TinyLMError
from tinylm.tokenizer import EOT, HFTokenizer, tokenizer_hash

ROOT = Path(__file__).resolve().parents[1]


def tokens(out: Path, split: str) -> np.ndarray:
    return np.asarray(TokenData(out).split(split)[:])


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text(
        "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8"
    )
    return path


# ----- exactly today's tokens for a single text file ---------------------------------------------
def test_char_shakespeare_is_the_standard_contiguous_split(tmp_path, shakespeare_text):
    meta = prepare(["shakespeare"], tmp_path / "d", "char")
    cut = int(len(shakespeare_text) * 0.9)  # char-rnn / nanoGPT: first 90% train, last 10% validation
    index = {c: i for i, c in enumerate(sorted(set(shakespeare_text)))}
    ids = np.fromiter((index[c] for c in shakespeare_text), dtype=np.int64, count=len(shakespeare_text))
    assert np.array_equal(tokens(tmp_path / "d", "train"), ids[:cut])
    assert np.array_equal(tokens(tmp_path / "d", "val"), ids[cut:])
    assert meta["split"] == "contiguous 0.9/0.1" and meta["documents"] == 1 and meta["train_tokens"] == cut
    assert meta["xxh3_128"] == xxhash.xxh3_128(shakespeare_text.encode()).hexdigest()  # the file's


def test_bpe_in_pieces_equals_bpe_on_the_whole_text(tmp_path, monkeypatch, shakespeare_text):
    """Training and encoding in pieces cut at safe points gives bit for bit the tokenizer and tokens of
    one giant string (what prepare did before), here with 2,000-character pieces: hundreds of cuts."""
    text = shakespeare_text[:300_000]
    (tmp_path / "s.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(encoding, "PIECE_CHARS", 2_000)
    import tinylm.data.build as build

    monkeypatch.setattr(build, "PIECE_CHARS", 2_000)
    meta = prepare([str(tmp_path / "s.txt")], tmp_path / "d", "bpe", vocab_size=400)
    cut = int(len(text) * 0.9)
    whole = HFTokenizer.train_bpe([text[:cut]], 400)
    assert TokenData(tmp_path / "d").tokenizer_hash == tokenizer_hash(whole)
    assert np.array_equal(tokens(tmp_path / "d", "train"), whole.encode(text[:cut]))
    assert np.array_equal(tokens(tmp_path / "d", "val"), whole.encode(text[cut:]))
    assert meta["tokenizer_sample"]["chars"] == cut


def test_safe_cuts_never_change_bpe_tokens(shakespeare_text):
    tok = HFTokenizer.train_bpe([shakespeare_text[:50_000]], 300)
    text = shakespeare_text[:20_000] + "  \n\n x\n\ty \n" + shakespeare_text[20_000:30_000]
    cuts = [c for c in (safe_cut(text, lo, lo + 500) for lo in range(0, len(text), 500)) if c]
    assert len(cuts) > 40
    for cut in cuts:
        assert tok.encode(text[:cut]) + tok.encode(text[cut:]) == tok.encode(text), cut
    line = (
        " ".join(shakespeare_text[:20_000].split()) + "  !x\t'll 12 34"
    )  # one long line: cuts between words
    cuts = [c for c in (safe_cut(line, lo, lo + 300) for lo in range(0, len(line), 300)) if c]
    assert len(cuts) > 50 and all(line[c] == " " for c in cuts)
    for cut in cuts:
        assert tok.encode(line[:cut]) + tok.encode(line[cut:]) == tok.encode(line), cut
    assert safe_cut("a\n b\nc", 0, 6) == 5 and safe_cut("a \nb", 0, 4) is None  # spaces next to \n: no cut
    assert safe_cut("a  b", 0, 4) is None and next_safe_cut("ab\n cd ef", 0) == 6


# ----- documents: formats, separators, held-out documents ----------------------------------------
def test_every_format_reads_the_same_documents(tmp_path):
    pytest.importorskip("pyarrow")
    pytest.importorskip("zstandard")
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = [f"Document {i}: {'word ' * (i + 3)}end." for i in range(20)]
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", docs[:5])
    (folder / "b.jsonl.gz").write_bytes(
        gzip.compress(write_jsonl(tmp_path / "x.jsonl", docs[5:10]).read_bytes())
    )
    pq.write_table(pa.table({"text": docs[10:15], "n": list(range(5))}), folder / "c.parquet")
    for i, d in enumerate(docs[15:18]):
        (folder / "sub" / f"d{i}.txt").write_text(d, encoding="utf-8")
    (folder / "sub" / "e.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(docs[18].encode()))
    (folder / "sub" / "f.txt.gz").write_bytes(gzip.compress(docs[19].encode()))
    (folder / "notes.md").write_text("not read: a folder takes .txt, .jsonl and .parquet")
    meta = prepare([str(folder)], tmp_path / "d", "char", val_fraction=0.1)
    data = TokenData(tmp_path / "d")
    train = data.tokenizer.decode(tokens(tmp_path / "d", "train").tolist()).split("\n\n")
    val = data.tokenizer.decode(tokens(tmp_path / "d", "val").tolist()).split("\n\n")
    assert val == [docs[9], docs[19]]  # 1 in every 10 documents, whole: the 10th and the 20th
    assert train == [d for i, d in enumerate(docs) if i not in (9, 19)]
    assert meta["documents"] == 20 and meta["train_documents"] == 18 and meta["val_documents"] == 2
    assert meta["split"] == "whole documents, 1 in every 10 held out for validation"
    assert meta["inputs"] == [
        {"input": str(folder), "files": 8, "documents": 20, "bytes": sum(len(d.encode()) for d in docs)}
    ]


def test_bpe_documents_are_separated_by_end_of_text(tmp_path, shakespeare_text):
    docs = [shakespeare_text[i * 3000 : (i + 1) * 3000] for i in range(12)]
    jsonl = write_jsonl(tmp_path / "docs.jsonl", docs, field="body")
    with pytest.raises(TinyLMError, match="no text field 'text' \\(it has: body, id\\); pass --text-field"):
        prepare([str(jsonl)], tmp_path / "d0", "bpe", vocab_size=300)
    meta = prepare([str(jsonl)], tmp_path / "d", "bpe", vocab_size=300, text_field="body")
    tok = TokenData(tmp_path / "d").tokenizer
    train = tokens(tmp_path / "d", "train")
    eot = tok.eot_id
    assert meta["separator"] == EOT and int((train == eot).sum()) == 10  # 11 training documents
    pieces = np.split(train, np.flatnonzero(train == eot))
    assert [tok.decode(p[p != eot].tolist()) for p in pieces] == docs[:9] + docs[10:]
    assert tok.decode(tokens(tmp_path / "d", "val").tolist()) == docs[9]


def test_too_few_documents_hold_out_the_last_ones(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "a.txt").write_text("hello world " * 100)
    (folder / "b.txt").write_text("second file " * 100)
    meta = prepare([str(folder)], tmp_path / "d", "char")
    assert (
        meta["train_documents"] == meta["val_documents"] == 1
        and "the last 1 (50% of the text)" in meta["split"]
    )
    tok = TokenData(tmp_path / "d").tokenizer
    assert tok.decode(tokens(tmp_path / "d", "val").tolist()) == "second file " * 100
    assert tok.decode(tokens(tmp_path / "d", "train").tolist()) == "hello world " * 100
    assert meta["train_chars"] + meta["val_chars"] == 2400
    # a short last document is not enough validation text: as many last documents as hold 10% of it
    (folder / "c.txt").write_text("third file " * 100)
    (folder / "d.txt").write_text("tail")
    meta = prepare([str(folder)], tmp_path / "e", "char")
    assert meta["val_documents"] == 2 and meta["val_chars"] == 1100 + 2 + 4
    tok = TokenData(tmp_path / "e").tokenizer
    assert tok.decode(tokens(tmp_path / "e", "val").tolist()) == "third file " * 100 + "\n\ntail"
    assert len(tokens(tmp_path / "e", "train")) == meta["train_chars"] == 2400 + 2
    with pytest.raises(TinyLMError, match="single document"):
        prepare([str(write_jsonl(tmp_path / "one.jsonl", ["only one"]))], tmp_path / "f", "char")


def test_held_out_documents_are_a_pure_function_of_position():
    for fraction, pattern in [
        (0.1, [9, 19, 29]),
        (0.25, [3, 7, 11, 15, 19, 23, 27]),
        (0.5, list(range(1, 30, 2))),
    ]:
        rule = HeldOut(fraction)
        assert [i for i in range(30) if rule.is_val(i)] == pattern
    assert not HeldOut(0.9).is_val(0)  # the first document always trains


def test_hf_streams_a_local_dataset_with_its_official_split(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "hfset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [f"train document {i} " * 20 for i in range(6)])
    write_jsonl(folder / "validation.jsonl", [f"validation document {i} " * 20 for i in range(2)])
    meta = prepare([f"hf:{folder}"], tmp_path / "d", "char")
    assert meta["split"] == "official" and meta["train_documents"] == 6 and meta["val_documents"] == 2
    tok = TokenData(tmp_path / "d").tokenizer
    assert tok.decode(tokens(tmp_path / "d", "val").tolist()) == "\n\n".join(
        f"validation document {i} " * 20 for i in range(2)
    )
    with pytest.raises(TinyLMError, match="no column 'body'"):
        prepare([f"hf:{folder}"], tmp_path / "e", "char", text_field="body")


@pytest.mark.parametrize(
    "content",
    [
        b"a" * 4321 + b"\xff" + b"b" * 100,  # a byte that is never UTF-8
        b"a" * 4321 + b"\xe2\x80" + b"b" * 100,  # a character cut short
        b"a" * 4321 + b"\xed\xa0\x80" + b"b" * 100,  # a surrogate, which UTF-8 forbids
        b"\xc3\xa9" * 100 + b"a" * 4121 + b"\xc0\xaf",  # an overlong form
        b"a" * 4321 + "\u00e9".encode()[:1],  # the file ends inside a character
    ],
)
def test_a_bad_byte_is_named_at_its_offset_in_a_streamed_file(tmp_path, monkeypatch, content):
    monkeypatch.setattr(sources, "READ_BYTES", 1000)  # the bad byte lies several reads in
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    for tokenizer in ("char", "bpe"):  # read as bytes for the character lookup, decoded for BPE
        with pytest.raises(TinyLMError, match="not UTF-8 text.*offset 4321"):
            prepare([str(path)], tmp_path / "d", tokenizer, vocab_size=300)
        assert not (tmp_path / "d").exists() and not (tmp_path / ".d.partial").exists()  # nothing left


# ----- shards ----------------------------------------------------------------------------------------
def test_shards_read_as_one_sequence(tmp_path, shakespeare_slice):
    prepare([str(shakespeare_slice)], tmp_path / "one", "char")
    meta = prepare([str(shakespeare_slice)], tmp_path / "many", "char", shard_tokens=7_000)
    assert len(meta["shards"]["train"]) == 13 and meta["shards"]["train"][-1]["tokens"] == 90_000 - 12 * 7_000
    one, many = TokenData(tmp_path / "one").split("train"), TokenData(tmp_path / "many").split("train")
    assert isinstance(one, np.memmap) and isinstance(many, ShardedTokens) and len(one) == len(many)
    assert np.array_equal(many[:], one[:]) and np.array_equal(many[6_990:21_010], one[6_990:21_010])
    idx = np.random.default_rng(0).integers(0, len(one), size=(37, 65))
    assert np.array_equal(many[idx], one[idx]) and many[-1] == one[-1] and many[7_000] == one[7_000]
    with pytest.raises(IndexError):
        many[np.array([len(one)])]


def test_training_batches_across_shards_equal_one_shard(tmp_path, shakespeare_slice):
    from tinylm.config import TrainConfig

    prepare([str(shakespeare_slice)], tmp_path / "one", "char")
    prepare([str(shakespeare_slice)], tmp_path / "many", "char", shard_tokens=5_000)
    for cfg in (TrainConfig(max_steps=10, batch_size=8), TrainConfig(epochs=2, max_steps=0, batch_size=8)):
        (a, va), (b, vb) = (token_batches(TokenData(tmp_path / d), 32, cfg) for d in ("one", "many"))
        for step in (0, 3, a.total_steps - 1):
            assert all(np.array_equal(x, y) for x, y in zip(a.batch(step), b.batch(step)))
        assert all(np.array_equal(x[0], y[0]) for x, y in zip(va, vb))


def test_a_directory_from_before_shards_still_loads(tmp_path, char_data):
    old = tmp_path / "old"
    old.mkdir()
    data = TokenData(char_data)
    np.asarray(data.split("train")).tofile(old / "train.bin")
    np.asarray(data.split("val")).tofile(old / "val.bin")
    (old / "tokenizer.json").write_text((char_data / "tokenizer.json").read_text())
    legacy = {k: data.meta[k] for k in ("tokenizer", "vocab_size", "dtype", "sources", "split")}
    (old / "meta.json").write_text(json.dumps({**legacy, "train_tokens": 90_000, "val_tokens": 10_000}))
    again = TokenData(old)
    assert np.array_equal(again.split("train"), data.split("train")) and len(again.split("val")) == 10_000


# ----- the output directory: atomic, never mixed, resumable --------------------------------------
def test_existing_output_is_reused_refused_or_replaced(tmp_path, shakespeare_slice):
    out = tmp_path / "d"
    first = prepare([str(shakespeare_slice)], out, "char")
    assert prepare([str(shakespeare_slice)], out, "char")["reused"]  # same inputs and options: nothing to do
    with pytest.raises(TinyLMError, match="already holds data prepared from other inputs"):
        prepare([str(shakespeare_slice)], out, "char", val_fraction=0.2)
    replaced = prepare([str(shakespeare_slice)], out, "char", val_fraction=0.2, force=True)
    assert (
        replaced["val_tokens"] == 20_000 != first["val_tokens"]
        and TokenData(out).meta["val_tokens"] == 20_000
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no staging or old copy left behind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(TinyLMError, match="not empty and holds no prepared data"):
        prepare([str(shakespeare_slice)], tmp_path / "other", "char")


def test_an_interrupted_prepare_with_other_options_is_discarded_not_mixed(
    tmp_path, monkeypatch, shakespeare_slice
):
    """A staging folder left by an interrupt: the same command resumes from it; other options start clean."""
    import tinylm.data.build as build

    out, staging = tmp_path / "d", tmp_path / ".d.partial"

    def interrupted(self, staging, meta):
        raise KeyboardInterrupt  # after every shard is written, before the rename

    def interrupt(out: Path) -> None:
        with monkeypatch.context() as m:
            m.setattr(build.Destination, "commit", interrupted)
            with pytest.raises(KeyboardInterrupt):
                prepare([str(shakespeare_slice)], out, "char", val_fraction=0.2)
        assert not out.exists() and (out.parent / f".{out.name}.partial" / "prepare-state.json").is_file()

    monkeypatch.setattr(encoding, "CHECKPOINT_SECONDS", 0.0)  # save the position after every batch
    interrupt(tmp_path / "same")
    same = prepare([str(shakespeare_slice)], tmp_path / "same", "char", val_fraction=0.2)
    assert same["resumed"] and same["resumed_tokens"] == 100_000 and same["val_tokens"] == 20_000
    interrupt(out)
    other = prepare([str(shakespeare_slice)], out, "char")  # val_fraction 0.1: other work
    assert not other["resumed"] and other["resumed_tokens"] == 0 and not staging.exists()
    prepare([str(shakespeare_slice)], tmp_path / "clean", "char")
    for name in ("train-00000.bin", "val-00000.bin", "tokenizer.json"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert TokenData(out).meta["val_tokens"] == 10_000
    old = tmp_path / "old"  # left by an older tinylm, whose state meant other things: started clean
    interrupt(old)
    state_path = tmp_path / ".old.partial" / "prepare-state.json"
    state = json.loads(state_path.read_text())
    del state["version"]
    state_path.write_text(json.dumps(state))
    again = prepare([str(shakespeare_slice)], old, "char", val_fraction=0.2)
    assert not again["resumed"] and again["resumed_tokens"] == 0
    assert (old / "train-00000.bin").read_bytes() == (tmp_path / "same" / "train-00000.bin").read_bytes()


PREPARE_CLI = """
import sys
import tinylm.data.encoding as encoding
encoding.CHECKPOINT_SECONDS = float(sys.argv[1])  # save the position after every batch
from tinylm.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _prepare_cmd(text: Path, out: Path, *extra: str, every: float = 30.0) -> list[str]:
    return [sys.executable, "-c", PREPARE_CLI, str(every), "prepare", str(text), "--tokenizer", "bpe",
            "--vocab-size", "300", "--tokenizer-sample", "300000", "--shard-tokens", "20000", "--out", str(out),
            "--no-progress", *extra]  # fmt: skip


def test_a_killed_prepare_leaves_nothing_that_looks_complete_and_resumes(tmp_path, shakespeare_text):
    """SIGKILL a real prepare mid-encoding: no output directory appears; running it again keeps the
    trained tokenizer and the tokens written up to its last saved position, and gives bit for bit
    what an uninterrupted run gives."""
    text = tmp_path / "big.txt"
    text.write_text(shakespeare_text, encoding="utf-8")
    out, staging = tmp_path / "d", tmp_path / ".d.partial"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _prepare_cmd(text, out, every=0.0), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )

    def saved_tokens() -> int:
        try:
            state = json.loads((staging / "prepare-state.json").read_text())
        except (OSError, ValueError):
            return 0
        return sum(sum(v) for v in state.get("encoded", {}).get("shards", {}).values())

    deadline = time.time() + 120
    while saved_tokens() < 30_000 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert not out.exists() and (staging / "tokenizer.json").is_file()
    # bytes and a shard written after the last saved position, as a kill between two saves leaves them
    last = sorted(staging.glob("train-*.bin"))[-1]
    last.write_bytes(last.read_bytes() + b"\x07\x00" * 999)
    (staging / "train-00099.bin").write_bytes(b"\x07\x00" * 999)
    done = subprocess.run(
        _prepare_cmd(text, out, "--json"), env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["resumed"] and summary["resumed_tokens"] >= 30_000 and not staging.exists()
    clean = subprocess.run(_prepare_cmd(text, tmp_path / "clean"), env=env, capture_output=True, timeout=300)
    assert clean.returncode == 0
    for name in [p.name for p in (tmp_path / "clean").iterdir() if p.suffix == ".bin"] + ["tokenizer.json"]:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    ours, theirs = (json.loads((d / "meta.json").read_text()) for d in (out, tmp_path / "clean"))
    assert {k: v for k, v in ours.items() if k != "seconds"} == {
        k: v for k, v in theirs.items() if k != "seconds"
    }


def test_cli_prints_what_it_read_and_the_split(tmp_path, capsys):
    folder = tmp_path / "c"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [f"record {i} " * 10 for i in range(30)])
    assert main(["prepare", str(folder), "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"Read {folder}: 30 document(s)" in out and "1 in every 10 held out" in out
    assert "27 documents" in out and "3 documents" in out


def test_progress_shows_documents_tokens_and_throughput(tmp_path, capsys, shakespeare_text):
    """Plain lines (stderr is no terminal): the bar ends at the input's size; a .gz (size unknown) prints
    lines of the text read; both end with documents, tokens and MB/s."""
    (tmp_path / "s.txt").write_text(shakespeare_text[:200_500], encoding="utf-8")
    (tmp_path / "s.txt.gz").write_bytes(gzip.compress((tmp_path / "s.txt").read_bytes()))
    for name in ("s.txt", "s.txt.gz"):
        prepare([str(tmp_path / name)], tmp_path / f"d-{name}", "char", progress=True)
        last = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Tokenizing")][-1]
        assert "docs " in last and "tokens 200,500" in last and "MB_s " in last, last
        if name == "s.txt":
            assert "201/201 (100%)" in last, last  # kB: the last, partial one included


def test_characters_cut_by_a_read_are_whole(tmp_path, monkeypatch):
    """Reads of 7 bytes cut 2-, 3- and 4-byte characters; the 90% cut of a single file is made on its
    bytes (known from its size, no counting pass) and moved back to the start of the character there."""
    monkeypatch.setattr(sources, "READ_BYTES", 7)
    inside = 0  # cuts that fell inside a character
    for extra in ("", "x", "xx", "東", "東x", "🙂"):
        text = "naïve café — 東京 🙂 façade\n" * 50 + extra
        raw = text.encode()
        (tmp_path / "u.txt").write_text(text, encoding="utf-8")
        meta = prepare([str(tmp_path / "u.txt")], tmp_path / "d", "char", force=True)
        tok = TokenData(tmp_path / "d").tokenizer
        at = int(len(raw) * 0.9)
        inside += raw[at] & 0xC0 == 0x80
        while raw[at] & 0xC0 == 0x80:
            at -= 1
        train, val = raw[:at].decode(), raw[at:].decode()
        assert tok.decode(tokens(tmp_path / "d", "train").tolist()) == train
        assert tok.decode(tokens(tmp_path / "d", "val").tolist()) == val
        assert meta["xxh3_128"] == xxhash.xxh3_128(raw).hexdigest()
        assert meta["train_bytes"] == at and meta["val_bytes"] == len(raw) - at
        assert meta["train_chars"] == len(train) and meta["val_chars"] == len(val)
    assert inside >= 2


@pytest.mark.parametrize("lazy", [True, False])
def test_a_cut_inside_a_character_moves_back_to_its_start(lazy):
    """As int() rounds a character count down: a tiny file keeps its last character for validation."""
    from tinylm.data.sources import Chunk, Utf8Text
    from tinylm.data.splits import route

    def chunk(raw: bytes, first: bool) -> Chunk:
        return Chunk(Utf8Text(raw, "f", 0) if lazy else raw.decode(), first, "", raw)

    def split(chunks: list[Chunk], cut: int) -> list[tuple]:
        return [(p.split, str(p.text), p.first, p.nbytes) for p in route(chunks, 0.1, cut=cut)]

    two = [chunk("abé".encode(), True), chunk(b"cd", False)]  # é is bytes 2 and 3
    assert split(two, 3) == [("train", "ab", True, 2), ("val", "é", True, 2), ("val", "cd", False, 2)]
    assert split(two, 4) == [("train", "abé", True, 4), ("val", "cd", True, 2)]  # at a chunk's end
    assert split([chunk("aé€b".encode(), True)], 2) == [("train", "a", True, 1), ("val", "é€b", True, 6)]
    assert split([chunk("é".encode(), True), chunk(b"x", False)], 1) == [  # inside the first character
        ("val", "é", True, 2),
        ("val", "x", False, 1),
    ]


def test_the_corpus_hash_is_that_of_the_documents_joined_by_blank_lines():
    """hashed() digests what passes, text or bytes, in order: one text file hashes to its content's
    hash, and documents hash as if joined by blank lines."""
    import random

    from tinylm.data.encoding import hashed
    from tinylm.data.sources import Chunk

    rng = random.Random(0)
    sizes = [rng.choice([0, 1, 200, 5_000, 70_000]) for _ in range(300)]
    chunks = [Chunk("é" * (n // 2) + "x" * (n % 2), rng.random() < 0.5, "", None) for n in sizes]
    chunks = [c._replace(raw=c.text.encode()) if i % 3 else c for i, c in enumerate(chunks)]
    joined = ""
    for i, chunk in enumerate(chunks):
        joined += ("\n\n" if chunk.first and i else "") + chunk.text
    digest = xxhash.xxh3_128()
    assert list(hashed(chunks, digest)) == chunks
    assert digest.hexdigest() == xxhash.xxh3_128(joined.encode()).hexdigest()


@pytest.mark.parametrize("how", ["direct", "page cache", "direct refused at a write"])
def test_shards_hold_exactly_what_was_written_however_they_are_written(tmp_path, monkeypatch, how):
    """Shards of 10,000 bytes (not a multiple of the 4 KiB blocks O_DIRECT writes) through a stage of 3
    blocks: writes of any size and dtype, flushes, a resume from a flush after more was written, reads
    and a truncation give the same bytes whether they went to disk directly or through the page cache."""
    import errno

    import tinylm.data.appender as appender
    from tinylm.data.shards import ShardWriter

    if how != "page cache":
        probe = tmp_path / "probe"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0)))
        except OSError:
            pytest.skip("this file system refuses O_DIRECT")
        if not appender.DIRECT:
            pytest.skip("no O_DIRECT on this platform")
    monkeypatch.setattr(appender, "DIRECT", how != "page cache")
    monkeypatch.setattr(appender, "STAGE_BYTES", 3 * appender.ALIGN)
    used = {"direct": 0, "refused": 0}
    pwrite = os.pwrite

    def watched(fd, data, offset):
        if (
            how == "direct refused at a write"
            and used["direct"] == 2
            and not used["refused"]
            and fd in directs
        ):
            used["refused"] += 1
            directs.discard(fd)
            raise OSError(errno.EINVAL, "refused")
        used["direct"] += fd in directs
        return pwrite(fd, data, offset)

    directs: set[int] = set()
    opened = appender.Appender.__init__

    def open_watched(self, *args, **kwargs):
        opened(self, *args, **kwargs)
        if self._direct is not None:
            directs.add(self._direct)

    monkeypatch.setattr(appender.os, "pwrite", watched)
    monkeypatch.setattr(appender.Appender, "__init__", open_watched)
    rng = np.random.default_rng(0)
    dtypes = [np.uint16, np.uint32, np.int64, np.uint8]
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), shard_tokens=5_000)
    expected: list[np.ndarray] = []
    for i in range(80):
        ids = rng.integers(0, 250, int(rng.integers(0, 3_000))).astype(dtypes[i % 4])
        writer.write(ids)
        expected.append(ids.astype(np.uint16))
        if i == 40:  # a checkpoint, more written, then a crash: a new writer resumes from the checkpoint
            counts = writer.flush()
            writer.write(rng.integers(0, 250, 9_000).astype(np.uint16))
            writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), shard_tokens=5_000)
            writer.restore(counts)
        if i == 60:
            whole = np.concatenate(expected)
            assert np.array_equal(writer.read(len(whole) - 7_000, len(whole)), whole[-7_000:])
    whole = np.concatenate(expected)
    writer.truncate(len(whole) - 4_321)
    writer.write(whole[-4_321:][::-1])
    whole = np.concatenate([whole[:-4_321], whole[-4_321:][::-1]])
    shards = writer.close()
    assert [e["tokens"] for e in shards] == [5_000] * (len(whole) // 5_000) + [len(whole) % 5_000]
    on_disk = np.concatenate([np.fromfile(tmp_path / e["file"], dtype=np.uint16) for e in shards])
    assert np.array_equal(on_disk, whole)
    if how == "page cache":
        assert used == {"direct": 0, "refused": 0}
    else:  # the refused writer went on through the page cache; the next shards' writers wrote directly
        assert used["direct"] > 10 and used["refused"] == (how != "direct")


def test_shard_writing_errors_are_reported_not_hidden(tmp_path, monkeypatch):
    """A full disk under a direct write is raised (not retried through the page cache); closing twice
    does nothing the second time; a resume whose last shard is gone is one clear error; and
    TINYLM_DIRECT_IO=0 turns direct writes off."""
    import errno

    import tinylm.data.appender as appender
    from tinylm.data.shards import ShardWriter

    monkeypatch.setattr(appender, "STAGE_BYTES", appender.ALIGN)
    out = appender.Appender(tmp_path / "a.bin", np.dtype(np.uint16))
    if out._direct is not None:
        pwrite = os.pwrite

        def full(fd, data, offset):
            if fd == out._direct:
                raise OSError(errno.ENOSPC, "No space left on device")
            return pwrite(fd, data, offset)

        monkeypatch.setattr(appender.os, "pwrite", full)
        with pytest.raises(OSError, match="No space"):
            out.append(np.zeros(appender.ALIGN, dtype=np.uint16))
        monkeypatch.setattr(appender.os, "pwrite", pwrite)
    out.close()
    other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT)  # may reuse a number the first one had
    out.close()
    os.fstat(other)  # still open
    os.close(other)
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), shard_tokens=1_000)
    writer.write(np.arange(1_500, dtype=np.uint16))
    counts = writer.flush()
    writer.close()
    (tmp_path / "train-00001.bin").unlink()
    with pytest.raises(TinyLMError, match="missing or shorter than the saved progress"):
        ShardWriter(tmp_path, "train", np.dtype(np.uint16), shard_tokens=1_000).restore(counts)
    code = "import tinylm.data.appender as a; print(a.DIRECT)"
    env = {**os.environ, "TINYLM_DIRECT_IO": "0"}
    assert (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout
        == "False\n"
    )
