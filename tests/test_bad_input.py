"""Bad inputs across every command: one `error: ...` line on stderr, exit 2, no traceback, runs untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinylm.cli import main

# (id, argv with {placeholders}, a fragment of the one-sentence error)
ROWS: list[tuple[str, str, str]] = [
    # prepare
    ("prepare-missing-input", "prepare {tmp}/nope.txt --out {new}", "nope.txt"),
    ("prepare-empty-file", "prepare {empty} --out {new}", "empty"),
    ("prepare-binary-file", "prepare {binary} --out {new}", "utf-8"),
    ("prepare-latin1-file", "prepare {latin1} --out {new}", "utf-8"),
    ("prepare-out-under-file", "prepare {text} --out {file}/sub", "sub"),
    ("prepare-bad-val-fraction", "prepare {text} --val-fraction 1.5 --out {new}", "val"),
    ("prepare-jsonl-missing-field", "prepare {nokey} --out {new}", "no text field 'text'"),
    ("prepare-jsonl-not-json", "prepare {notjson} --out {new}", "line 1"),
    ("prepare-glob-matches-nothing", "prepare {tmp}/*.nothing --out {new}", "matches no files"),
    ("prepare-out-holds-other-data", "prepare {text} --out {otherdata}", "already holds"),
    ("prepare-out-not-empty", "prepare {text} --out {dir}", "not empty"),
    (
        "prepare-zero-tokenizer-sample",
        "prepare {text} --tokenizer bpe --tokenizer-sample 0 --out {new}",
        "sample",
    ),
    ("prepare-corrupt-gzip", "prepare {badgz} --out {new}", "bad.txt.gz"),
    # train
    ("train-missing-data", "train --data {tmp}/nope --out {new}", "nope"),
    ("train-data-is-file", "train --data {file} --out {new}", "file.txt"),
    ("train-existing-out", "train --data {data} --out {run} --max-steps 1", "already"),
    ("train-out-under-file", "train --data {data} --out {file}/sub --max-steps 1", "sub"),
    ("train-negative-lr", "train --data {data} --out {new} --lr -1", "lr"),
    ("train-zero-steps", "train --data {data} --out {new} --max-steps 0", "max_steps"),
    ("train-grad-accum-over-epoch", "train --data {data} --out {new} --epochs 1 --grad-accum 100000", "grad"),
    ("train-negative-eval-tokens", "train --data {data} --out {new} --set eval_tokens=-1", "eval_tokens"),
    ("train-resume-missing", "train --resume {tmp}/nope", "nope"),
    ("train-resume-not-a-run", "train --resume {dir}", "dir"),
    # generate
    ("generate-missing-run", "generate {tmp}/nope", "nope"),
    ("generate-run-is-file", "generate {file}", "is a file"),
    ("generate-truncated-weights", "generate {trunc} --max-new-tokens 2", "trunc"),
    ("generate-garbage-config", "generate {badconfig} --max-new-tokens 2", "badconfig"),
    ("generate-garbage-meta", "generate {badmeta} --max-new-tokens 2", "badmeta"),
    ("generate-top-p-above-1", "generate {run} --top-p 1.5", "top"),
    ("generate-zero-new-tokens", "generate {run} --max-new-tokens 0", "new"),
    ("generate-negative-new-tokens", "generate {run} --max-new-tokens -3", "new"),
    ("generate-zero-temperature", "generate {run} --temperature 0", "temperature"),
    ("generate-negative-top-k", "generate {run} --top-k -1", "top"),
    ("generate-missing-checkpoint", "generate {run} --checkpoint nope", "nope"),
    # eval
    ("eval-missing-text", "eval {run} --text {tmp}/missing.txt", "missing.txt"),
    ("eval-text-is-dir", "eval {run} --text {dir}", "dir"),
    ("eval-binary-text", "eval {run} --text {binary}", "utf-8"),
    ("eval-empty-text", "eval {run} --text {empty}", "empty"),
    ("eval-missing-data", "eval {run} --data {tmp}/nope", "nope"),
    ("eval-other-tokenizer-data", "eval {run} --data {otherdata}", "tokenizer"),
    ("eval-zero-max-tokens", "eval {run} --max-tokens 0", "max-tokens"),
    ("train-resume-garbage-state", "train --resume {badstate}", "badstate"),
    # info / plot
    ("info-missing-run", "info {tmp}/nope", "nope"),
    ("info-unknown-preset", "info --preset nope", "nope"),
    ("plot-missing-run", "plot {tmp}/nope", "nope"),
    ("plot-out-under-file", "plot {run} --out {file}/sub/loss.png", "sub"),
    # apps
    ("complete-missing-run", "complete {tmp}/nope hello", "nope"),
    ("story-zero-temperature", "story {run} dragons --temperature 0", "temperature"),
    ("ask-top-p-above-1", "ask {run} why --top-p 2", "top"),
    ("ask-index-missing", "ask {run} why --index {tmp}/nope", "nope"),
    ("ask-index-not-an-index", "ask {run} why --index {dir}", "dir"),
    ("ask-index-negative-k", "ask {run} why --index {index} --k -1", "k"),
    # attention
    ("attention-missing-run", "attention {tmp}/nope --prompt hi", "nope"),
    ("attention-out-under-file", "attention {run} --prompt hi --out {file}/sub/a.png", "sub"),
    ("attention-zero-tokens", "attention {run} --prompt hi --tokens 0", "tokens"),
    # finetune
    ("finetune-missing-data", "finetune {run} --data {tmp}/missing.jsonl --out {new}", "missing.jsonl"),
    ("finetune-existing-out", "finetune {run} --data {pairs} --out {lorarun}", "already"),
    ("finetune-jsonl-missing-key", "finetune {run} --data {nokey} --out {new}", "line 1"),
    ("finetune-jsonl-wrong-type", "finetune {run} --data {wrongtype} --out {new}", "line 1"),
    ("finetune-jsonl-not-json", "finetune {run} --data {notjson} --out {new}", "line 1"),
    ("finetune-jsonl-only-blank", "finetune {run} --data {blank} --out {new}", "no prompt"),
    ("finetune-other-char-tokenizer", "finetune {run} --data {samevocab} --out {new}", "tokenizer"),
    (
        "finetune-negative-lr",
        "finetune {run} --data {pairs} --out {new} --lr -0.1",
        "lr (-0.1) must be positive",
    ),
    ("finetune-missing-run", "finetune {tmp}/nope --data {pairs} --out {new}", "nope"),
    # merge
    ("merge-missing-run", "merge {tmp}/nope --out {new}", "nope"),
    ("merge-existing-out", "merge {lorarun} --out {run}", "already"),
    ("merge-not-lora", "merge {run} --out {new}", "LoRA"),
    # export / import-hf
    ("export-hf-existing-out", "export {run} --out {dir}", "exist"),
    ("export-hf-missing-run", "export {tmp}/nope --out {new}", "nope"),
    ("export-hf-truncated", "export {trunc} --out {new}", "trunc"),
    ("export-gguf-existing-out", "export {run} --format gguf --out {file}", "exist"),
    ("export-gguf-out-under-file", "export {run} --format gguf --out {file}/m.gguf", "is a file"),
    ("import-hf-missing-src", "import-hf {tmp}/nope --out {new}", "nope"),
    ("import-hf-src-is-file", "import-hf {file} --out {new}", "file.txt"),
    ("import-hf-garbage-config", "import-hf {badhf} --out {new}", "config.json"),
    ("import-hf-existing-out", "import-hf {hf} --out {run}", "already"),
    # index
    ("index-missing-docs", "index {tmp}/nope.txt --out {new} --run {run}", "nope.txt"),
    ("index-binary-docs", "index {binary} --out {new} --run {run}", "utf-8"),
    ("index-existing-out", "index {text} --out {dir} --run {run}", "exist"),
    (
        "index-missing-tokenizer",
        "index {text} --out {new} --tokenizer {tmp}/t.json --passage-tokens 9",
        "t.json",
    ),
    # serve / harness: argument errors only
    ("serve-missing-run", "serve {tmp}/nope", "nope"),
    ("serve-zero-batch", "serve {run} --max-batch 0", "max-batch"),
    ("serve-zero-limit", "serve {run} --max-n 0", "max-n"),
    ("serve-port-taken", "serve {run} --port {taken}", "choose another --port"),
    ("serve-port-out-of-range", "serve {run} --port 70000", "--port"),
    ("harness-missing-run", "harness {tmp}/nope --tasks hellaswag", "nope"),
    # everyday use (issue 21): a finished run says how to go on; typos get "did you mean"
    ("train-finished-run-out", "train --data {data} --out {run}", "tinylm train --resume"),
    ("train-set-key-typo", "train --data {data} --out {new} --set n_layers=2", "Did you mean 'n_layer'?"),
    ("info-preset-typo", "info --preset cpu-lama", "Did you mean 'cpu-llama'?"),
    ("chat-missing-run", "chat {tmp}/nope", "nope"),
    # consolidate (a sharded checkpoint that already has its single file: tests/test_distributed.py)
    ("consolidate-missing-run", "consolidate {tmp}/nope", "nope"),
    ("consolidate-missing-checkpoint", "consolidate {run} --checkpoint nope", "nope"),
    ("consolidate-not-sharded", "consolidate {run}", "not sharded"),
    # issue 22: threads and the speedrun options
    ("train-zero-threads", "train --data {data} --out {new} --threads 0", "--threads must be at least 1"),
    ("eval-negative-threads", "eval {run} --threads -2", "--threads must be at least 1"),
    ("train-too-many-value-embeds", "train --data {data} --out {new} --set value_embeds=9", "value_embeds"),
    ("train-ramp-without-steps", "train --data {data} --out {new} --set block_size_start=8", "ramp_steps"),
    ("export-hf-speedrun-model", "export {speedrun} --out {new}", "not exportable"),
    (
        "export-gguf-speedrun-model",
        "export {speedrun} --format gguf --out {new}.gguf",
        "cannot be written to gguf",
    ),
]


def _hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, char_data: Path, shakespeare_text: str):
    """Every bad input the table names, built once; yields the placeholders, checks tiny_run is untouched."""
    from tinylm.data import prepare
    from tinylm.export import export_hf
    from tinylm.finetune import finetune
    from tinylm.lora import LoRAConfig
    from tinylm.rag import build_index
    from tinylm.tokenizer import load_tokenizer

    tmp = tmp_path_factory.mktemp("bad")
    before = _hashes(tiny_run)
    p: dict[str, Path] = {"tmp": tmp, "run": tiny_run, "data": char_data}
    p["file"] = tmp / "file.txt"
    p["file"].write_text("just a file\n", encoding="utf-8")
    p["dir"] = tmp / "dir"
    (p["dir"] / "x").mkdir(parents=True)
    p["empty"] = tmp / "empty.txt"
    p["empty"].write_bytes(b"")
    p["binary"] = tmp / "binary.txt"
    p["binary"].write_bytes(bytes(range(256)) * 8)
    p["latin1"] = tmp / "latin1.txt"
    p["latin1"].write_bytes("café crème à la carte\n".encode("latin-1") * 20)
    p["text"] = tmp / "text.txt"
    p["text"].write_text(shakespeare_text[:5_000], encoding="utf-8")
    p["badgz"] = tmp / "bad.txt.gz"
    p["badgz"].write_bytes(b"\x1f\x8b" + b"not gzip data" * 10)
    # another tokenizer: characters of other text (a different vocabulary)
    other = tmp / "other.txt"
    other.write_text("".join(sorted(set(shakespeare_text)))[:20] * 300 + "0123456789" * 100, encoding="utf-8")
    p["otherdata"] = tmp / "otherdata"
    prepare([str(other)], p["otherdata"], "char")
    # a char tokenizer of the same vocabulary size with another order: compared by hash, not size
    base_text = shakespeare_text[:100_000]  # what char_data (and so tiny_run) was prepared from
    chars = sorted(set(base_text))
    spare = next(c for c in "0123456789#@%" if c not in chars)
    rot = "".join(chars[:-1]) + spare  # the last character swapped for an unused one
    vocab = load_tokenizer(tiny_run / "tokenizer.json").vocab_size
    assert len(chars) == vocab
    perm = tmp / "perm.txt"
    perm.write_text(base_text.translate(str.maketrans("".join(chars), rot)), encoding="utf-8")
    p["samevocab"] = tmp / "samevocab"
    prepare([str(perm)], p["samevocab"], "char")
    # JSONL fine-tuning data
    p["pairs"] = tmp / "pairs.jsonl"
    p["pairs"].write_text(
        "\n".join(
            json.dumps({"prompt": "Q: what" + "?" * i + " ", "response": "A good answer."}) for i in range(8)
        )
        + "\n",
        encoding="utf-8",
    )
    for name, body in {
        "nokey": '{"prompt": "hi"}\n',
        "wrongtype": '{"prompt": "hi", "response": 3}\n',
        "notjson": "prompt: hi\n",
        "blank": "\n\n  \n",
    }.items():
        p[name] = tmp / f"{name}.jsonl"
        p[name].write_text(body, encoding="utf-8")
    # a run whose model uses a speedrun option (QK-norm: no weights of its own) that no exporter computes
    p["speedrun"] = tmp / "speedrun"
    shutil.copytree(tiny_run, p["speedrun"])
    record = json.loads((p["speedrun"] / "config.json").read_text(encoding="utf-8"))
    record["model"]["qk_norm"] = True
    (p["speedrun"] / "config.json").write_text(json.dumps(record), encoding="utf-8")
    # corrupt copies of the run
    for name in ("trunc", "badconfig", "badmeta", "badstate"):
        p[name] = tmp / name
        shutil.copytree(tiny_run, p[name])
    for weights in p["trunc"].rglob("model.safetensors"):
        weights.write_bytes(weights.read_bytes()[:100])
    (p["badconfig"] / "config.json").write_text("{not json", encoding="utf-8")
    for meta in p["badmeta"].rglob("meta.json"):
        meta.write_text("\x00garbage", encoding="utf-8")
    for state in p["badstate"].rglob("state.pt"):
        state.write_bytes(b"garbage")
    # a LoRA run (for merge), a Hugging Face export (for import-hf), an index (for ask --index)
    p["lorarun"] = tmp / "lorarun"
    finetune(
        tiny_run, p["pairs"], p["lorarun"], lora=LoRAConfig(), overrides={"max_steps": 1}, progress=False
    )
    p["hf"] = tmp / "hf"
    export_hf(tiny_run, p["hf"])
    p["badhf"] = tmp / "badhf"
    shutil.copytree(p["hf"], p["badhf"])
    (p["badhf"] / "config.json").write_text("[1, 2", encoding="utf-8")
    p["index"] = tmp / "index"
    build_index([str(p["text"])], p["index"], load_tokenizer(tiny_run / "tokenizer.json"), 16)
    taken = socket.socket()  # a port something else listens on (tinylm serve must refuse it)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    p["taken"] = taken.getsockname()[1]
    yield p
    taken.close()
    assert _hashes(tiny_run) == before, "a bad input changed the shared run"


@pytest.mark.parametrize(("argv", "fragment"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input(paths, tmp_path: Path, capsys: pytest.CaptureFixture, argv: str, fragment: str) -> None:
    places = {k: str(v) for k, v in paths.items()} | {"new": str(tmp_path / "new")}
    code = main([a.format(**places) for a in argv.split()] + ["--no-progress"] * ("--no-progress" in ""))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert fragment.lower() in lines[0].lower(), err


def test_compile_failing_at_first_forward_falls_back(
    char_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A torch.compile whose compiled model raises when called: a warning, then eager training, exit 0."""

    def broken_compile(model, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("backend failed: no C compiler")

        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            str(char_data),
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--compile",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning:" in err and "Traceback" not in err
    assert (out / "config.json").is_file()


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "{run}", "--text", "{tmp}/missing.txt"],
        ["finetune", "{run}", "--data", "{tmp}/missing.jsonl", "--out", "{new}"],
        ["prepare", "{text}", "--out", "{file}/sub"],
    ],
    ids=["eval-missing-text", "finetune-missing-data", "prepare-out-under-file"],
)
def test_no_traceback_reaches_the_terminal(paths, tmp_path: Path, argv: list[str]) -> None:
    places = {k: str(v) for k, v in paths.items()} | {"new": str(tmp_path / "new")}
    proc = subprocess.run(
        [sys.executable, "-m", "tinylm", *(a.format(**places) for a in argv)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
