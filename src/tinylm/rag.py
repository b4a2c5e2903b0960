"""Retrieval-augmented generation: split documents into passages, index them with BM25 (bm25s),
retrieve the best passages for a question and answer from them.

The prompt template (`RAG_TEMPLATE`) puts the retrieved passages, best first and one per line,
before the same "Q: ... A:" lines as `tinylm ask` without an index:

    Context:
    Velmora Dask was born in Quillbrook. ...
    Orlan Vesk keeps a pet named Tibble. ...

    Q: Where was Velmora Dask born?
    A:

Truncation rule (`pack_passages`, the one rule for `tinylm ask --index`, `answer()` and `tinylm serve
--index`): the answer keeps min(max_new_tokens, block_size // 4) tokens of the context free; the
prompt without passages must fit in the rest (for `build_prompt`, else an error); passages are
added best first while they fit whole; the first passage that does not fit is cut to the tokens
left (its beginning kept, when at least `MIN_PIECE` tokens are left) and the rest are dropped.

Optional re-rank (`answer(..., rerank=True, keep=N)`, `tinylm ask --rerank --keep N`): the retrieved
passages are ordered by a model's mean log-likelihood of the question given each passage alone (the
prompt up to "Q:" with that passage, then the question), and the best `keep` are kept. The scoring
model is the answering one, or another run with the same tokenizer (`rerank_model=`, `--rerank-run`):
a model fine-tuned with the loss on answers only forgets how questions follow passages, its base
run does not.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tinylm.errors import TinyLMError
from tinylm.tokenizer import Tokenizer, load_tokenizer, tokenizer_hash

FORMAT_VERSION = 1  # bump when the index layout or the passage splitting changes
INDEX_FILE = "index.json"
PASSAGES_FILE = "passages.jsonl"
BM25_DIR = "bm25"
TEXT_SUFFIXES = (".txt", ".md")  # files taken from a documents directory
RAG_TEMPLATE = "Context:\n{context}\n\nQ: {question}\nA:"
NO_CONTEXT = "none"  # the context line when no passage is given or retrieved (plain letters: any vocabulary)
MIN_PIECE = 8  # a cut passage keeps at least this many tokens, else it is dropped
STOPWORDS = "en"  # bm25s's English stop-word list


@dataclass
class Passage:
    """One retrieved passage: its source file, its number in the index, its text and BM25 score."""

    file: str
    passage_no: int
    text: str
    score: float = 0.0
    likelihood: float | None = None  # with re-ranking: mean log-probability of the question's tokens


def default_passage_tokens(block_size: int, k: int = 3) -> int:
    """Passage cap so that k passages take at most three quarters of the context (the rest: question, answer)."""
    if k < 1:
        raise TinyLMError(f"k ({k}) must be at least 1.")
    cap = (3 * block_size // 4) // k
    if cap < MIN_PIECE:
        raise TinyLMError(
            f"A context of {block_size} tokens leaves {cap} tokens per passage for k={k}; use a smaller k."
        )
    return cap


# ----- reading and splitting ---------------------------------------------------------------
def read_documents(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(file, UTF-8 text) for each file given and each .txt/.md file under each directory given."""
    if not paths:
        raise TinyLMError("Give at least one documents file or directory to index.")
    files: list[Path] = []
    for spec in paths:
        path = Path(spec)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise TinyLMError(f"Directory {path} holds no {' or '.join(TEXT_SUFFIXES)} files to index.")
            files.extend(found)
        else:
            raise TinyLMError(f"Documents path {path} does not exist; give text files or directories.")
    docs = []
    for file in files:
        try:
            docs.append((file, file.read_text(encoding="utf-8")))
        except UnicodeDecodeError as exc:
            raise TinyLMError(
                f"{file} is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8 or leave it out."
            ) from None
    if not any(text.strip() for _, text in docs):
        raise TinyLMError(f"The documents ({', '.join(str(p) for p in paths)}) hold no text to index.")
    return docs


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs (separated by blank lines), each with its whitespace collapsed to single spaces."""
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return [p for p in paragraphs if p]


def cap_passage(text: str, tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    """Pieces of `text` of at most max_tokens tokens each: whole sentences packed greedily, long
    sentences split between words, long words split between tokens."""
    if max_tokens < 1:
        raise TinyLMError(f"The passage cap ({max_tokens} tokens) must be at least 1.")
    if len(tokenizer.encode(text)) <= max_tokens:
        return [text]
    units = [w for s in re.split(r"(?<=[.!?])\s+", text) for w in _fit_sentence(s, tokenizer, max_tokens)]
    return _pack(units, tokenizer, max_tokens)


def _pack(units: list[str], tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    """Units joined by spaces, greedily, into pieces of at most max_tokens tokens (a lone unit may exceed it)."""
    pieces: list[str] = []
    current = ""
    for unit in units:
        joined = f"{current} {unit}" if current else unit
        if current and len(tokenizer.encode(joined)) > max_tokens:
            pieces.append(current)
            joined = unit
        current = joined
    return [*pieces, current] if current else pieces


def _fit_sentence(sentence: str, tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    """The sentence whole, or its words packed into pieces under the cap (words over it cut by tokens)."""
    if len(tokenizer.encode(sentence)) <= max_tokens:
        return [sentence]
    pieces: list[str] = []
    words: list[str] = []
    for word in sentence.split(" "):
        ids = tokenizer.encode(word)
        if len(ids) > max_tokens:  # e.g. a URL or a run of symbols: cut between tokens
            pieces += _pack(words, tokenizer, max_tokens)
            words = []
            pieces.extend(tokenizer.decode(ids[i : i + max_tokens]) for i in range(0, len(ids), max_tokens))
        else:
            words.append(word)
    return pieces + _pack(words, tokenizer, max_tokens)


def split_passages(text: str, tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    """A document's passages: its paragraphs, each capped to max_tokens tokens."""
    return [piece for p in split_paragraphs(text) for piece in cap_passage(p, tokenizer, max_tokens)]


# ----- the index -----------------------------------------------------------------------------
def _bm25s() -> Any:
    """The bm25s module, or one clear error naming the extra that installs it."""
    try:
        import bm25s
    except ImportError:
        raise TinyLMError("Retrieval needs the bm25s package: pip install 'tinylm[rag]'.") from None
    return bm25s


def _bm25_tokens(texts: list[str], return_ids: bool = True) -> Any:
    return _bm25s().tokenize(texts, stopwords=STOPWORDS, return_ids=return_ids, show_progress=False)


def build_index(
    paths: Sequence[str | Path],
    out: str | Path,
    tokenizer: Tokenizer,
    passage_tokens: int,
    k1: float = 1.5,
    b: float = 0.75,
) -> dict[str, Any]:
    """Split the documents into passages, index them with BM25 and write the index to `out`
    (refused if it exists; written to a temporary sibling, then renamed). Returns its metadata."""
    bm25s = _bm25s()

    out = Path(out)
    if out.exists():
        raise TinyLMError(
            f"{out} already exists; choose a new --out for the index (nothing was overwritten)."
        )
    rows = []
    for file, text in read_documents(paths):
        for piece in split_passages(text, tokenizer, passage_tokens):
            rows.append({"file": str(file), "passage_no": len(rows), "text": piece})
    if not rows:
        raise TinyLMError("The documents hold no text to index.")
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(_bm25_tokens([r["text"] for r in rows]), show_progress=False)
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer_kind": tokenizer.kind,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "passage_tokens": passage_tokens,
        "bm25": {"k1": k1, "b": b, "method": "lucene", "stopwords": STOPWORDS, "library": "bm25s"},
        "passages": len(rows),
        "files": sorted({r["file"] for r in rows}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        retriever.save(str(tmp / BM25_DIR), show_progress=False)
        with open(tmp / PASSAGES_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (tmp / INDEX_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


class Index:
    """A BM25 index on disk, loaded: `Index.load(dir).search(question, k) -> list[Passage]`."""

    def __init__(self, path: Path, meta: dict[str, Any], rows: list[dict[str, Any]], retriever: Any) -> None:
        self.path, self.meta, self.rows, self.retriever = path, meta, rows, retriever

    @classmethod
    def load(cls, path: str | Path, tokenizer: Tokenizer | None = None) -> Index:
        """Load an index written by `build_index`; with `tokenizer`, check it was built for that tokenizer."""
        bm25s = _bm25s()

        path = Path(path)
        meta_file = path / INDEX_FILE
        if not meta_file.is_file():
            raise TinyLMError(f"No tinylm index at {path} (no {INDEX_FILE}); build one with `tinylm index`.")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TinyLMError(f"{meta_file} is corrupt (invalid JSON); rebuild the index.") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise TinyLMError(
                f"The index at {path} has format version {meta.get('format_version')!r}, but this tinylm "
                f"reads version {FORMAT_VERSION}; rebuild it with `tinylm index`."
            )
        try:
            lines = (path / PASSAGES_FILE).read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines]
            retriever = bm25s.BM25.load(str(path / BM25_DIR), show_progress=False)
        except (OSError, ValueError):  # a missing file, bad JSON, bad arrays
            raise TinyLMError(
                f"The index at {path} is incomplete or corrupt; rebuild it with `tinylm index`."
            ) from None
        index = cls(path, meta, rows, retriever)
        if tokenizer is not None:
            index.check_tokenizer(tokenizer)
        return index

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse a tokenizer other than the one the passages were capped with."""
        if tokenizer_hash(tokenizer) != self.meta["tokenizer_hash"]:
            raise TinyLMError(
                f"The index at {self.path} was built for another tokenizer than this model's; "
                "rebuild it with `tinylm index DOCS --run RUN_DIR`."
            )

    def __len__(self) -> int:
        return len(self.rows)

    def search(self, question: str, k: int = 3) -> list[Passage]:
        """The k best passages for the question, best first; passages sharing no word with it are left out."""
        if k < 1:
            raise TinyLMError(f"k ({k}) must be at least 1.")
        query = _bm25_tokens([question], return_ids=False)
        if not query[0]:
            return []
        docs, scores = self.retriever.retrieve(query, k=min(k, len(self.rows)), show_progress=False)
        hits = []
        for doc, score in zip(docs[0].tolist(), scores[0].tolist()):
            if score > 0:
                row = self.rows[doc]
                hits.append(Passage(row["file"], row["passage_no"], row["text"], float(score)))
        return hits


# ----- prompting and answering ---------------------------------------------------------------
def answer_reserve(block_size: int, max_new_tokens: int) -> int:
    """Tokens of the context kept free for the answer: min(max_new_tokens, block_size // 4)."""
    return max(0, min(max_new_tokens, block_size // 4))


def pack_passages(
    texts: Sequence[str],
    render: Callable[[list[str]], str],
    tokenizer: Tokenizer,
    block_size: int,
    max_new_tokens: int,
) -> list[str]:
    """The passages (best first) that `render` can hold within the context, by the truncation rule in this
    module's docstring; the last one may be cut. `render(passages)` is the whole prompt with them."""
    budget = block_size - answer_reserve(block_size, max_new_tokens)
    kept: list[str] = []
    for text in texts:
        if len(tokenizer.encode(render([*kept, text]))) <= budget:
            kept.append(text)
            continue
        cut = _cut_to_fit(render, kept, text, tokenizer, budget)
        if cut is not None:
            kept.append(cut)
        break
    return kept


def build_prompt(
    question: str,
    passages: Sequence[Passage | str],
    tokenizer: Tokenizer,
    block_size: int,
    max_new_tokens: int,
) -> str:
    """The RAG prompt for `question` with the passages (best first) that fit the context, by the
    truncation rule in this module's docstring."""
    question = " ".join(question.split())
    if not question:
        raise TinyLMError("The question is empty; ask something.")
    budget = block_size - answer_reserve(block_size, max_new_tokens)
    texts = [p.text if isinstance(p, Passage) else p for p in passages]
    bare = RAG_TEMPLATE.format(context=NO_CONTEXT, question=question)
    if len(tokenizer.encode(bare)) > budget:
        raise TinyLMError(
            f"The question takes {len(tokenizer.encode(bare))} tokens with the template, more than the "
            f"{budget} this model's context of {block_size} leaves; ask a shorter question."
        )
    render = lambda kept: _render(question, kept)  # noqa: E731
    return render(pack_passages(texts, render, tokenizer, block_size, max_new_tokens))


def _render(question: str, texts: Sequence[str]) -> str:
    context = "\n".join(" ".join(t.split()) for t in texts) or NO_CONTEXT
    return RAG_TEMPLATE.format(context=context, question=question)


def _cut_to_fit(
    render: Callable[[list[str]], str], kept: list[str], text: str, tokenizer: Tokenizer, budget: int
) -> str | None:
    """The longest beginning of `text` (whole tokens, at least MIN_PIECE) that still fits, or None."""
    ids = tokenizer.encode(" ".join(text.split()))

    def piece(n: int) -> str | None:
        cut = tokenizer.decode(ids[:n]).rstrip("\ufffd").strip()
        fits = cut and len(tokenizer.encode(render([*kept, cut]))) <= budget
        return cut if fits else None

    lo, hi = MIN_PIECE, len(ids) - 1  # binary search for the largest n that fits (fit shrinks with n)
    if hi < lo or piece(lo) is None:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if piece(mid) is not None else (lo, mid - 1)
    return piece(lo)


@dataclass
class Answer:
    """An answer with the prompt it came from and the passages it was given."""

    question: str
    text: str
    prompt: str
    sources: list[Passage]
    retrieved: int = 0  # passages retrieved (after re-ranking and keep) before packing into the context

    def summary(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.text,
            "sources": [asdict(p) for p in self.sources],
            "retrieved": self.retrieved,
        }

    def sources_line(self, block_size: int) -> str:
        """What to say above the sources, or why there are none."""
        if self.sources:
            return "Sources:"
        if self.retrieved:
            return (
                f"Sources: none: {self.retrieved} passage(s) retrieved, but none fits the model's "
                f"{block_size}-token context beside the question and the answer's room."
            )
        return "Sources: none (no passage shares a word with the question)"


def question_likelihood(model: Any, tokenizer: Tokenizer, question: str, text: str) -> float:
    """Mean log-probability (nats per token) of the question's tokens after the prompt with `text` alone."""
    import torch

    question = " ".join(question.split())
    prefix = _render(question, [text])[: -len(f" {question}\nA:")]  # "Context:\n...\n\nQ:"
    p, q = tokenizer.encode(prefix), tokenizer.encode(f" {question}")
    ids = (p + q)[-model.cfg.block_size :]  # a prefix too long for the context loses its beginning
    n = len(q)
    if n < 1 or len(ids) <= n:
        raise TinyLMError("The question is too long to re-rank passages within this model's context.")
    x = torch.tensor([ids], device=next(model.parameters()).device)
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[0, :-1].float(), dim=-1)  # (T-1, V)
    targets = x[0, 1:]
    return logp[-n:].gather(1, targets[-n:, None]).mean().item()


def rerank_passages(
    model: Any, tokenizer: Tokenizer, question: str, passages: Sequence[Passage]
) -> list[Passage]:
    """The passages ordered by the model's likelihood of the question given each (best first; ties keep order)."""
    scored = [
        Passage(
            p.file, p.passage_no, p.text, p.score, question_likelihood(model, tokenizer, question, p.text)
        )
        for p in passages
    ]
    return sorted(scored, key=lambda p: -(p.likelihood or 0.0))


def answer(
    model: Any,
    tokenizer: Tokenizer,
    index: Index | None,
    question: str,
    k: int = 3,
    max_new_tokens: int = 32,
    passages: Sequence[Passage] | None = None,
    rerank: bool = False,
    keep: int | None = None,
    rerank_model: Any | None = None,
    **sampling: Any,
) -> Answer:
    """Retrieve k passages (or use `passages`), optionally re-rank them (by `rerank_model`, a model with the
    same tokenizer, else `model`) and keep the best `keep`, build the prompt and generate the answer line
    (greedy by default): the first non-empty line the model writes."""
    from tinylm.apps import first_line
    from tinylm.config import sample_config

    if not question.strip():
        raise TinyLMError("The question is empty; ask something.")
    if keep is not None and keep < 1:
        raise TinyLMError(f"keep ({keep}) must be at least 1.")
    if passages is None:
        passages = index.search(question, k) if index is not None else []
    if rerank:
        passages = rerank_passages(rerank_model or model, tokenizer, question, passages)
    passages = list(passages)[:keep]
    block_size = model.cfg.block_size
    prompt = build_prompt(question, passages, tokenizer, block_size, max_new_tokens)
    sampling.setdefault("do_sample", False)
    text = first_line(
        model, tokenizer, prompt, sample_config(None, max_new_tokens=max_new_tokens, **sampling)
    )
    used = sum(1 for _ in _kept_passages(prompt))
    return Answer(question, text.strip(), prompt, list(passages)[:used], retrieved=len(passages))


def _kept_passages(prompt: str) -> list[str]:
    """The passage lines of a prompt built by build_prompt."""
    context = prompt[len("Context:\n") : prompt.rindex("\n\nQ: ")]
    return [] if context == NO_CONTEXT else context.split("\n")


def index_tokenizer(run_dir: str | Path | None, tokenizer_file: str | Path | None) -> Tokenizer:
    """The tokenizer an index is capped with: the run's, or a tokenizer file."""
    if run_dir is not None:
        from tinylm.checkpoint import RunRecord

        RunRecord.read(Path(run_dir))  # a clear error when it is not a run
        return load_tokenizer(Path(run_dir) / "tokenizer.json")
    if tokenizer_file is not None:
        return load_tokenizer(tokenizer_file)
    raise TinyLMError(
        "Give --run RUN_DIR (or --tokenizer FILE with --passage-tokens) to cap passages in tokens."
    )


@dataclass
class IndexRetriever:
    """`tinylm serve --index`: puts the passages retrieved for a query in front of any prompt, packed by
    `pack_passages` (the rule of `tinylm ask --index`)."""

    index: Index
    tokenizer: Tokenizer
    block_size: int
    k: int = 3

    def augment(self, query: str, prompt: str, max_new_tokens: int) -> tuple[str, list[dict]]:
        """("Context:\n{passages}\n\n" + prompt, leaving the answer its room; the sources of the passages kept)."""
        passages = self.index.search(query, self.k) if query.strip() else []
        render = lambda texts: _context_block(texts) + prompt if texts else prompt  # noqa: E731
        texts = [p.text for p in passages]
        kept = pack_passages(texts, render, self.tokenizer, self.block_size, max_new_tokens)
        sources = [{"file": p.file, "passage": p.passage_no, "score": p.score} for p in passages[: len(kept)]]
        return render(kept), sources


def _context_block(texts: Sequence[str]) -> str:
    return "Context:\n" + "\n".join(" ".join(t.split()) for t in texts) + "\n\n"


def load_retriever(
    index_dir: str | Path, tokenizer: Tokenizer, block_size: int, k: int = 3
) -> IndexRetriever:
    """The retriever `tinylm serve --index INDEX_DIR` uses (checked against the model's tokenizer)."""
    return IndexRetriever(Index.load(index_dir, tokenizer), tokenizer, block_size, k)
