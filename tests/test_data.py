import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tinylm.data import EpochWindows, RandomWindows, SlidingWindowDataset, TokenData, prepare
from tinylm.errors import TinyLMError
from tinylm.viz import read_metrics


def test_prepare_char_writes_contiguous_split(tmp_path, shakespeare_slice):
    meta = prepare([str(shakespeare_slice)], tmp_path, "char")
    text = shakespeare_slice.read_text()
    data = TokenData(tmp_path)
    train, val = data.split("train"), data.split("val")
    assert train.dtype == np.uint16 and meta["train_tokens"] == len(train) == 90_000 and len(val) == 10_000
    tok = data.tokenizer
    assert tok.decode(train[:200].tolist()) == text[:200]
    assert tok.decode(val[:200].tolist()) == text[90_000:90_200]  # validation is the last 10%
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert (
        on_disk["xxh3_128"] and on_disk["val_chars"] == 10_000 and on_disk["split"].startswith("contiguous")
    )


def test_prepare_builtin_and_directory(tmp_path, shakespeare_slice):
    meta = prepare(["shakespeare"], tmp_path / "a", "char")
    assert meta["vocab_size"] == 65 and meta["train_tokens"] == 1_003_854
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("hello world " * 100)
    (folder / "b.txt").write_text("second file " * 100)
    meta = prepare([str(folder)], tmp_path / "b", "bpe", vocab_size=300)
    assert meta["tokenizer"] == "bpe" and meta["train_tokens"] > 0


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing.txt", "is not a file"),
        (lambda p: (p / "empty.txt").write_text("   ") and p / "empty.txt", "empty"),
        (lambda p: (p / "bin.txt").write_bytes(b"ok\xff\xfe") and p / "bin.txt", "not UTF-8"),
        (lambda p: (p / "d").mkdir() or p / "d", "no .txt files"),
        (  # JSON can spell half of a surrogate pair; it is not text
            lambda p: (
                (p / "s.jsonl").write_text('{"text": "ok"}\n{"text": "a \\ud800 b"}\n') and p / "s.jsonl"
            ),
            r"s.jsonl line 2 holds '\\ud800', half of a surrogate pair",
        ),
    ],
)
def test_prepare_bad_inputs(tmp_path, setup, message):
    with pytest.raises(TinyLMError, match=message):
        prepare([str(setup(tmp_path))], tmp_path / "out", "char")


def test_hf_source_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TinyLMError, match="datasets|Hugging Face"):
        prepare(["hf:wikitext:wikitext-2-raw-v1"], tmp_path, "char")


def test_random_windows_targets_are_shifted_and_resumable():
    tokens = np.arange(1000, dtype=np.uint16)
    s = RandomWindows(tokens, block_size=16, batch_size=4, seed=0)
    x, y = s.batch(3)
    assert x.shape == (4, 16) and torch.equal(y, x + 1)
    assert torch.equal(s.batch(3)[0], x) and not torch.equal(s.batch(4)[0], x)
    # two ranks see the two halves of the single-process global batch
    full = RandomWindows(tokens, 16, 8, seed=0).batch(5)[0]
    halves = [RandomWindows(tokens, 16, 4, seed=0, rank=r, world_size=2).batch(5)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), full)


def test_sliding_window_dataset_covers_every_position():
    tokens = np.arange(50, dtype=np.uint16)
    ds = SlidingWindowDataset(tokens, block_size=8)
    assert len(ds) == 50 - 8
    x, y = ds[0]
    assert x.tolist() == list(range(8)) and y.tolist() == list(range(1, 9))
    assert ds[len(ds) - 1][1][-1].item() == 49
    batches = list(DataLoader(ds, batch_size=7, shuffle=True))
    starts = sorted(int(s) for xb, _ in batches for s in xb[:, 0])
    assert starts == list(range(len(ds)))
    with pytest.raises(IndexError):
        ds[len(ds)]
    epoch = EpochWindows(ds, batch_size=6, seed=1)
    seen = torch.cat([epoch.batch(0, i)[0][:, 0] for i in range(epoch.batches_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == 6 * (len(ds) // 6)


def test_corpus_shorter_than_context_is_a_clear_error():
    with pytest.raises(TinyLMError, match="shorter than one context window"):
        RandomWindows(np.arange(10, dtype=np.uint16), block_size=32, batch_size=2, seed=0)


def test_hf_source_uses_official_splits(tmp_path, monkeypatch, shakespeare_text):
    datasets = pytest.importorskip("datasets")
    local = datasets.IterableDatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"text": [shakespeare_text[:30_000], shakespeare_text[30_000:60_000]]}
            ).to_iterable_dataset(),
            "validation": datasets.Dataset.from_dict(
                {"text": [shakespeare_text[60_000:70_000]]}
            ).to_iterable_dataset(),
        }
    )
    calls = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, config=None, **kw: calls.append((name, config, kw)) or local
    )
    meta = prepare(["hf:wikitext:wikitext-2-raw-v1"], tmp_path, "char")
    assert calls == [
        ("wikitext", "wikitext-2-raw-v1", {"streaming": True})
    ]  # streamed, never downloaded whole
    # two training documents with a blank line between them (they used to be glued together)
    assert meta["split"] == "official" and meta["train_tokens"] == 60_002 and meta["val_tokens"] == 10_000
    assert meta["train_documents"] == 2 and meta["val_documents"] == 1
    with pytest.raises(TinyLMError, match="hf:NAME or hf:NAME:CONFIG"):
        prepare(["hf:"], tmp_path, "char")


def test_epoch_label_never_passes_the_last_epoch():
    ds = SlidingWindowDataset(np.arange(200, dtype=np.uint16), block_size=8)
    source = EpochWindows(ds, batch_size=8, seed=0, epochs=1, grad_accum=2)
    assert source.total_steps == source.steps_per_epoch == len(ds) // 8 // 2
    assert [source.label(s) for s in (0, source.total_steps)] == ["Epoch 1/1", "Epoch 1/1"]
    assert source.epoch_done(source.total_steps) == 1 and source.epoch_done(1) is None


def test_grad_accum_larger_than_an_epoch_is_a_clear_error():
    ds = SlidingWindowDataset(np.arange(100, dtype=np.uint16), block_size=8)
    with pytest.raises(TinyLMError, match="--grad-accum \\(50\\) is larger than the 11 batches of one epoch"):
        EpochWindows(ds, batch_size=8, seed=0, grad_accum=50)


def test_a_resumed_source_checks_it_reads_the_same_data():
    source = RandomWindows(np.arange(1000, dtype=np.uint16), 16, 4, seed=0)
    source.load_state_dict(source.state_dict())
    other = RandomWindows(np.arange(900, dtype=np.uint16), 16, 4, seed=0)
    with pytest.raises(TinyLMError, match="training data changed"):
        other.load_state_dict(source.state_dict())


def test_window_order_is_a_seeded_bijection_computed_per_batch():
    from tinylm.data import WindowOrder

    for n in (1, 2, 3, 7, 64, 1000, 4097, 99_991):
        order = WindowOrder(n, seed=3, epoch=1)(np.arange(n))
        assert np.array_equal(np.sort(order), np.arange(n)), n
    a = WindowOrder(10_000, seed=3, epoch=1)(np.arange(10_000))
    assert np.array_equal(WindowOrder(10_000, seed=3, epoch=1)(np.arange(5_000, 5_100)), a[5_000:5_100])
    assert not np.array_equal(
        WindowOrder(10_000, seed=3, epoch=2)(np.arange(10_000)), a
    )  # a new order per epoch
    assert not np.array_equal(WindowOrder(10_000, seed=4, epoch=1)(np.arange(10_000)), a)
    assert abs(np.corrcoef(np.arange(10_000), a)[0, 1]) < 0.05  # shuffled, not a shifted identity


def test_epoch_checkpoints_name_their_order():
    ds = SlidingWindowDataset(np.arange(200, dtype=np.uint16), block_size=8)
    source = EpochWindows(ds, batch_size=8, seed=0)
    state = source.state_dict()
    assert state["order"] == "feistel"
    source.load_state_dict(state)
    old = {k: v for k, v in state.items() if k != "order"}  # written before the order was a bijection
    with pytest.raises(TinyLMError, match="older tinylm, which ordered each epoch's windows differently"):
        source.load_state_dict(old)


def test_eval_tokens_sets_the_validation_budget(char_data, tmp_path):
    from tinylm.config import TrainConfig
    from tinylm.data import token_batches
    from tinylm.train import train

    data = TokenData(char_data)
    _, val = token_batches(data, 32, TrainConfig(batch_size=4, eval_tokens=1000))
    assert len(val) == 8 and sum(x.numel() for x, _ in val) == 1024  # whole batches: ceil(1000 / 128)
    _, val = token_batches(data, 32, TrainConfig(batch_size=4, eval_batches=3))
    assert len(val) == 3
    with pytest.warns(UserWarning, match=r"Validation \(3 batches, eval_tokens=300\)"):
        train(
            char_data,
            tmp_path / "run",
            "tiny",
            {"max_steps": 2, "eval_tokens": 300, "batch_size": 4},
            progress=False,
        )
    rows = read_metrics(tmp_path / "run")
    evals = [r for r in rows if r["type"] == "eval"]
    assert evals and all(r["val_tokens"] == 3 * 4 * 32 and r["eval_tokens"] == 300 for r in evals)
