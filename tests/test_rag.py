"""Retrieval-augmented generation: splitting, capping, the prompt's truncation rule, the index,
`tinylm index` / `tinylm ask --index` through the CLI, bad input, and a fast end-to-end pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tinylm.cli import main
from tinylm.errors import TinyLMError
from tinylm.rag import (
    FORMAT_VERSION,
    MIN_PIECE,
    NO_CONTEXT,
    RAG_TEMPLATE,
    Index,
    Passage,
    answer_reserve,
    build_index,
    build_prompt,
    cap_passage,
    default_passage_tokens,
    question_likelihood,
    rerank_passages,
    split_paragraphs,
    split_passages,
    tokenizer_hash,
)
from tinylm.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from make_rag_set import make_set  # noqa: E402

CHARS = CharTokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;'?!()\n-")


@pytest.fixture(scope="module")
def rag_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated reading-comprehension set, small: 60 people, 12 held out."""
    out = tmp_path_factory.mktemp("ragset") / "set"
    make_set(out, people=60, test_people=12, per_file=10, seed=0)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----- splitting and capping -----------------------------------------------------------------
def test_split_paragraphs_on_blank_lines_and_collapses_whitespace() -> None:
    text = "First line\nstill first.\n\n\n  Second   one.\n \nThird.\n"
    assert split_paragraphs(text) == ["First line still first.", "Second one.", "Third."]
    assert split_paragraphs("\n \n\n") == []


def test_cap_passage_packs_whole_sentences_under_the_cap() -> None:
    text = "One two three. Four five six seven. Eight."
    pieces = cap_passage(text, CHARS, 20)
    assert pieces == ["One two three.", "Four five six seven.", "Eight."]
    assert all(len(CHARS.encode(p)) <= 20 for p in pieces)
    assert cap_passage(text, CHARS, 100) == [text]  # fits whole: untouched


def test_cap_passage_splits_long_sentences_between_words_and_long_words_between_tokens() -> None:
    text = "alpha beta gamma delta epsilon. " + "x" * 25
    pieces = cap_passage(text, CHARS, 12)
    assert all(len(CHARS.encode(p)) <= 12 for p in pieces)
    assert pieces[:4] == ["alpha beta", "gamma delta", "epsilon.", "x" * 12]
    assert "".join(pieces).replace(" ", "") == text.replace(" ", "")  # nothing lost


def test_split_passages_caps_every_paragraph() -> None:
    text = "Short one.\n\n" + " ".join(f"word{i}." for i in range(30))
    passages = split_passages(text, CHARS, 16)
    assert passages[0] == "Short one."
    assert all(len(CHARS.encode(p)) <= 16 for p in passages)
    assert " ".join(passages[1:]) == " ".join(f"word{i}." for i in range(30))


def test_default_passage_tokens_leaves_a_quarter_of_the_context() -> None:
    assert default_passage_tokens(96, 3) == 24
    assert default_passage_tokens(256, 1) == 192
    with pytest.raises(TinyLMError, match="smaller k"):
        default_passage_tokens(32, 5)


# ----- the prompt and its truncation rule ----------------------------------------------------
def test_build_prompt_template_and_order() -> None:
    prompt = build_prompt("Where?", [Passage("a.txt", 0, "First fact."), "Second fact."], CHARS, 200, 20)
    assert prompt == "Context:\nFirst fact.\nSecond fact.\n\nQ: Where?\nA:"
    assert build_prompt("  Where \n now? ", [], CHARS, 200, 20) == "Context:\nnone\n\nQ: Where now?\nA:"


def test_build_prompt_cuts_the_first_passage_that_does_not_fit_and_drops_the_rest() -> None:
    bare = len("Context:\n\n\nQ: Who?\nA:")  # the template around the passages, in characters = tokens
    block, new = 100, 10  # reserve min(10, 100 // 4) = 10 tokens for the answer: the prompt gets 90
    assert answer_reserve(block, new) == 10
    first = "a" * 30
    room = 90 - bare - len(first) - 1  # what is left for the second passage after its newline
    prompt = build_prompt("Who?", [first, "b" * 60, "c" * 5], CHARS, block, new)
    assert prompt == f"Context:\n{first}\n{'b' * room}\n\nQ: Who?\nA:"
    assert len(CHARS.encode(prompt)) == 90


def test_build_prompt_drops_a_piece_shorter_than_min_piece() -> None:
    bare = len("Context:\n\n\nQ: Who?\nA:")
    first = "a" * (90 - bare - 1 - (MIN_PIECE - 1))  # leaves MIN_PIECE - 1 tokens for the second
    prompt = build_prompt("Who?", [first, "b" * 40], CHARS, 100, 10)
    assert prompt == f"Context:\n{first}\n\nQ: Who?\nA:"


def test_build_prompt_reserve_is_capped_at_a_quarter_of_the_context() -> None:
    assert answer_reserve(64, 200) == 16
    prompt = build_prompt("Who?", ["z" * 100], CHARS, 64, 200)
    assert len(CHARS.encode(prompt)) == 64 - 16


def test_build_prompt_fits_with_a_bpe_tokenizer(rag_set: Path) -> None:
    tok = HFTokenizer.train_bpe([(rag_set / "train_docs.txt").read_text()], 300)
    passages = [q["passage"] for q in read_jsonl(rag_set / "qa_train.jsonl")[:8]]
    for block in (64, 96, 160):
        prompt = build_prompt("In which town was Kaiku Mosail born?", passages, tok, block, 16)
        assert len(tok.encode(prompt)) <= block - answer_reserve(block, 16)
        assert prompt.endswith("\n\nQ: In which town was Kaiku Mosail born?\nA:")


def test_build_prompt_refuses_an_empty_or_too_long_question() -> None:
    with pytest.raises(TinyLMError, match="question is empty"):
        build_prompt("  ", [], CHARS, 100, 10)
    with pytest.raises(TinyLMError, match="shorter question"):
        build_prompt("why " * 30, [], CHARS, 100, 10)


# ----- the index ---------------------------------------------------------------------------
def test_tokenizer_hash_survives_save_and_load(tmp_path: Path) -> None:
    tok = HFTokenizer.train_bpe(["some text to train a tokenizer on, some more text"], 270)
    tok.save(tmp_path / "t.json")
    assert tokenizer_hash(load_tokenizer(tmp_path / "t.json")) == tokenizer_hash(tok)
    assert tokenizer_hash(CharTokenizer("abc")) != tokenizer_hash(CharTokenizer("abd"))


def test_index_retrieves_the_gold_passage_of_held_out_questions(rag_set: Path, tmp_path: Path) -> None:
    meta = build_index([rag_set / "docs"], tmp_path / "index", CHARS, 64)
    assert meta["format_version"] == FORMAT_VERSION and meta["passages"] == 180  # 60 people x 3 facts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary directory left behind
    index = Index.load(tmp_path / "index", CHARS)
    qa = read_jsonl(rag_set / "qa_test.jsonl")
    top3 = [index.search(q["question"], 3) for q in qa]
    recall3 = sum(any(h.text == q["passage"] for h in hits) for q, hits in zip(qa, top3)) / len(qa)
    recall1 = sum(hits[0].text == q["passage"] for q, hits in zip(qa, top3)) / len(qa)
    assert recall3 >= 0.95 and recall1 >= 0.8, (recall1, recall3)
    hits = top3[0]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].file.endswith(".txt") and index.rows[hits[0].passage_no]["text"] == hits[0].text
    assert index.search("zzzz qqqq", 3) == []  # nothing shares a word: no passage


def test_build_index_refuses_an_existing_out(rag_set: Path, tmp_path: Path) -> None:
    (tmp_path / "index").mkdir()
    with pytest.raises(TinyLMError, match="already exists"):
        build_index([rag_set / "docs"], tmp_path / "index", CHARS, 64)


# ----- the CLI: tinylm index and tinylm ask --index ---------------------------------------------
@pytest.fixture(scope="module")
def set_run(rag_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny character model (context 256) trained a few steps on the set's documents."""
    from tinylm.data import prepare
    from tinylm.train import train

    tmp = tmp_path_factory.mktemp("setrun")
    (tmp / "template.txt").write_text(
        RAG_TEMPLATE.format(context=NO_CONTEXT, question="Who?")
    )  # its characters
    (tmp / "qa_train.txt").write_text(
        (rag_set / "qa_train.jsonl").read_text()
    )  # the questions' characters, as text
    prepare(
        [str(rag_set / "docs"), str(tmp / "qa_train.txt"), str(tmp / "template.txt")],
        tmp / "data",
        "char",
    )
    train(
        tmp / "data",
        tmp / "run",
        "tiny",
        {"block_size": 256, "max_steps": 5, "warmup_steps": 1, "eval_interval": 5},
        progress=False,
    )
    return tmp / "run"


@pytest.fixture(scope="module")
def set_index(rag_set: Path, set_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("setindex") / "index"
    assert main(["index", str(rag_set / "docs"), "--run", str(set_run), "--out", str(out)]) == 0
    return out


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_index_cli_records_its_settings(rag_set: Path, set_run: Path, tmp_path: Path, capsys) -> None:
    code, out, _ = run_cli(
        ["index", str(rag_set / "docs"), "--run", str(set_run), "--out", str(tmp_path / "i"), "--json"],
        capsys,
    )
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["passages"] == 180 and summary["passage_tokens"] == default_passage_tokens(256, 3) == 64
    assert summary["tokenizer_hash"] == tokenizer_hash(load_tokenizer(set_run / "tokenizer.json"))
    assert summary["bm25"]["library"] == "bm25s" and summary["format_version"] == FORMAT_VERSION
    assert json.loads((tmp_path / "i" / "index.json").read_text())["passages"] == 180


def test_ask_with_index_prints_the_answer_and_its_sources(
    rag_set: Path, set_run: Path, set_index: Path, capsys
) -> None:
    q = read_jsonl(rag_set / "qa_test.jsonl")[0]
    argv = ["ask", str(set_run), q["question"], "--index", str(set_index), "--k", "2", "--greedy"]
    code, out, err = run_cli([*argv, "--max-new-tokens", "8", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["question"] == q["question"] and summary["text"] == summary["answer"]
    sources = summary["sources"]
    assert len(sources) == 2 and sources[0]["text"] == q["passage"] and sources[0]["file"] == q["file"]
    assert sources[0]["score"] >= sources[1]["score"] > 0
    assert "Sources:" in out and f"passage {sources[0]['passage_no']}" in out


def test_answer_api_uses_the_same_prompt(rag_set: Path, set_run: Path, set_index: Path) -> None:
    from tinylm.checkpoint import load_run
    from tinylm.rag import answer

    run = load_run(set_run)
    index = Index.load(set_index, run.tokenizer)
    q = read_jsonl(rag_set / "qa_test.jsonl")[1]
    result = answer(run.model, run.tokenizer, index, q["question"], k=3, max_new_tokens=8)
    hits = index.search(q["question"], 3)
    assert result.prompt == build_prompt(q["question"], hits, run.tokenizer, 256, 8)
    assert result.sources == hits and q["passage"] in result.prompt
    assert result.retrieved == 3 and result.summary()["retrieved"] == 3


def test_sources_line_says_why_there_are_none() -> None:
    """A 64-character context can hold the question but no passage: say so, not "no passage shares a word"."""
    from tinylm.rag import Answer

    hit = Passage("f.txt", 3, "Duke of Milan", 5.4)
    assert Answer("q", "a", "p", [hit], retrieved=1).sources_line(64) == "Sources:"
    line = Answer("q", "a", "p", [], retrieved=3).sources_line(64)
    assert "3 passage(s) retrieved" in line and "64-token context" in line
    assert "shares a word" in Answer("q", "a", "p", [], retrieved=0).sources_line(64)


# ----- re-ranking by the model's likelihood of the question ---------------------------------------
@pytest.mark.numerics
def test_question_likelihood_matches_a_token_by_token_reference(rag_set: Path, set_run: Path) -> None:
    """The mean log-probability of the question's tokens, against one forward pass per token (fp32:
    the same dot products over fewer positions, so they agree to rounding)."""
    import torch

    from tinylm.checkpoint import load_run

    run = load_run(set_run)
    q = read_jsonl(rag_set / "qa_test.jsonl")[0]
    prefix = f"Context:\n{q['passage']}\n\nQ:"
    p, qs = run.tokenizer.encode(prefix), run.tokenizer.encode(f" {q['question']}")
    ids = p + qs
    with torch.no_grad():
        ref = [
            torch.log_softmax(run.model(torch.tensor([ids[:j]]))[0, -1], -1)[ids[j]].item()
            for j in range(len(p), len(ids))
        ]
    got = question_likelihood(run.model, run.tokenizer, q["question"], q["passage"])
    assert got == pytest.approx(sum(ref) / len(ref), abs=1e-4)


def test_rerank_orders_by_likelihood_and_keep_trims(rag_set: Path, set_run: Path, set_index: Path) -> None:
    from tinylm.checkpoint import load_run
    from tinylm.rag import answer

    run = load_run(set_run)
    index = Index.load(set_index, run.tokenizer)
    q = read_jsonl(rag_set / "qa_test.jsonl")[2]
    hits = index.search(q["question"], 3)
    ranked = rerank_passages(run.model, run.tokenizer, q["question"], hits)
    assert sorted(p.passage_no for p in ranked) == sorted(h.passage_no for h in hits)
    scores = [p.likelihood for p in ranked]
    assert all(s is not None and s < 0 for s in scores) and scores == sorted(scores, reverse=True)
    for p in ranked:  # each score is that passage's own
        assert p.likelihood == question_likelihood(run.model, run.tokenizer, q["question"], p.text)
    result = answer(
        run.model, run.tokenizer, index, q["question"], k=3, max_new_tokens=8, rerank=True, keep=1
    )
    assert result.sources == ranked[:1]
    assert result.prompt == build_prompt(q["question"], ranked[:1], run.tokenizer, 256, 8)


def test_ask_rerank_prints_the_kept_passages_with_their_likelihood(
    rag_set: Path, set_run: Path, set_index: Path, capsys
) -> None:
    q = read_jsonl(rag_set / "qa_test.jsonl")[0]
    argv = ["ask", str(set_run), q["question"], "--index", str(set_index), "--rerank", "--keep", "2"]
    code, out, err = run_cli([*argv, "--rerank-run", str(set_run), "--max-new-tokens", "4", "--json"], capsys)
    assert code == 0, err
    sources = json.loads(out.strip().splitlines()[-1])["sources"]
    assert len(sources) == 2 and sources[0]["likelihood"] >= sources[1]["likelihood"]
    assert "question log-likelihood" in out


# ----- bad input: one clear sentence each, exit 2 ----------------------------------------------
def _bad_inputs(tmp: Path, rag_set: Path, run: Path, index: Path) -> list[tuple[str, list[str], str]]:
    (tmp / "empty_dir").mkdir()
    (tmp / "blank.txt").write_text("\n  \n\n")
    (tmp / "latin1.txt").write_bytes("Caf\xe9 au lait.".encode("latin-1"))
    old = tmp / "old_index"
    build_index([rag_set / "docs"], old, load_tokenizer(run / "tokenizer.json"), 32)
    meta = json.loads((old / "index.json").read_text())
    (old / "index.json").write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    CharTokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .'?").save(tmp / "other_tok.json")
    other = tmp / "other_index"
    build_index([rag_set / "docs"], other, load_tokenizer(tmp / "other_tok.json"), 32)
    broken = tmp / "broken_index"
    build_index([rag_set / "docs"], broken, load_tokenizer(run / "tokenizer.json"), 32)
    (broken / "passages.jsonl").unlink()
    q, idx = "In which town was Kaiku Mosail born?", str(index)
    new = str(tmp / "new_index")
    return [
        ("missing docs", ["index", str(tmp / "nope"), "--run", str(run), "--out", new], "does not exist"),
        ("empty dir", ["index", str(tmp / "empty_dir"), "--run", str(run), "--out", new], "holds no .txt"),
        ("empty docs", ["index", str(tmp / "blank.txt"), "--run", str(run), "--out", new], "hold no text"),
        ("non-UTF-8", ["index", str(tmp / "latin1.txt"), "--run", str(run), "--out", new], "is not UTF-8"),
        ("existing out", ["index", str(rag_set / "docs"), "--run", str(run), "--out", idx], "already exists"),
        (
            "no cap",
            ["index", str(rag_set / "docs"), "--tokenizer", str(tmp / "other_tok.json"), "--out", new],
            "--passage-tokens",
        ),
        ("no tokenizer", ["index", str(rag_set / "docs"), "--out", new], "--run RUN_DIR"),
        ("other version", ["ask", str(run), q, "--index", str(old)], "format version"),
        ("other tokenizer", ["ask", str(run), q, "--index", str(other)], "another tokenizer"),
        ("empty question", ["ask", str(run), "   ", "--index", idx], "question is empty"),
        ("missing index", ["ask", str(run), q, "--index", str(tmp / "nope")], "No tinylm index"),
        ("broken index", ["ask", str(run), q, "--index", str(broken)], "incomplete or corrupt"),
        ("bad k", ["ask", str(run), q, "--index", idx, "--k", "0"], "k (0) must be at least 1"),
        ("keep alone", ["ask", str(run), q, "--index", idx, "--keep", "1"], "add --rerank"),
        ("rerank without index", ["ask", str(run), q, "--rerank"], "add --index"),
        ("bad keep", ["ask", str(run), q, "--index", idx, "--rerank", "--keep", "0"], "keep (0) must be"),
    ]


def test_bad_input_is_one_clear_sentence_and_exit_2(
    rag_set: Path, set_run: Path, set_index: Path, tmp_path: Path, capsys
) -> None:
    for name, argv, phrase in _bad_inputs(tmp_path, rag_set, set_run, set_index):
        code, out, err = run_cli(argv, capsys)
        assert code == 2, (name, code, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], (name, err)
        assert not (tmp_path / "new_index").exists(), name


# ----- retrieval and prompting on the measured set ----------------------------------------------
def test_retrieval_puts_held_out_answers_in_the_prompt(rag_set: Path, set_run: Path, set_index: Path) -> None:
    """What benchmarks/bench_rag.py measures, without the training: held-out answers reach the prompt
    through retrieval (k=1, k=3) and never without it; every fine-tuning pair carries its answer."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_rag

    tok = load_tokenizer(set_run / "tokenizer.json")
    index = Index.load(set_index, tok)
    qa = read_jsonl(rag_set / "qa_test.jsonl")

    def reach(contexts: list) -> float:
        prompts = [build_prompt(q["question"], c, tok, 256, 16) for q, c in zip(qa, contexts)]
        return sum(q["answer"] in p for q, p in zip(qa, prompts)) / len(qa)

    assert reach([index.search(q["question"], 3) for q in qa]) >= 0.95
    assert reach([index.search(q["question"], 1) for q in qa]) >= 0.8
    assert reach([[] for _ in qa]) == 0.0
    train_qa = read_jsonl(rag_set / "qa_train.jsonl")
    pairs = bench_rag.finetune_pairs(index, train_qa, tok, 256, 3, seed=0)
    assert len(pairs) == 4 * len(train_qa)  # gold alone; k=2 and k=3 in retrieval order; k=3 shuffled
    assert all(p["response"].strip() in p["prompt"] and p["prompt"].endswith("\nA:") for p in pairs)
    held_out = frozenset(q["passage"] for q in qa)
    kept_out = bench_rag.finetune_pairs(index, train_qa, tok, 256, 3, seed=0, held_out=held_out)
    assert not any(passage in p["prompt"] for p in kept_out for passage in held_out)
    assert all(p["response"].strip() in p["prompt"] for p in kept_out)


def test_serve_retriever_packs_passages_by_the_rule_of_ask(rag_set: Path, tmp_path: Path) -> None:
    """`tinylm serve --index` packs passages with pack_passages, the rule of build_prompt: the answer keeps
    min(max_tokens, block_size // 4) tokens free and the first passage that does not fit is cut."""
    from tinylm.rag import load_retriever, pack_passages

    build_index([rag_set / "docs"], tmp_path / "index", CHARS, 64)
    q = read_jsonl(rag_set / "qa_test.jsonl")[0]
    prompt = f"Q: {q['question']}\nA:"
    hits = Index.load(tmp_path / "index").search(q["question"], 3)
    render = lambda texts: "Context:\n" + "\n".join(texts) + "\n\n" + prompt if texts else prompt  # noqa: E731
    for block, new in ((256, 16), (128, 200), (96, 200)):  # 200: a chat request without max_tokens
        retriever = load_retriever(tmp_path / "index", CHARS, block_size=block, k=3)
        text, sources = retriever.augment(q["question"], prompt, max_new_tokens=new)
        kept = pack_passages([h.text for h in hits], render, CHARS, block, new)
        assert text == render(kept) and len(sources) == len(kept) >= 1
        assert len(CHARS.encode(text)) <= block - answer_reserve(block, new)  # the answer keeps its room
        assert text.startswith("Context:\n") and text.endswith("\n\n" + prompt)
    assert (
        " ".join(q["passage"].split())
        in load_retriever(tmp_path / "index", CHARS, 256).augment(q["question"], prompt, 16)[0]
    )
    assert kept[-1] not in [h.text for h in hits]  # at 96 tokens the last passage kept was cut to fit
    assert set(sources[0]) == {"file", "passage", "score"}
    assert retriever.augment("zzzz qqqq", prompt, max_new_tokens=16) == (prompt, [])
    with pytest.raises(TinyLMError, match="another tokenizer"):
        load_retriever(tmp_path / "index", CharTokenizer("abc"), block_size=256)
