"""The retrieval hook: `tinylm serve --index INDEX_DIR` puts retrieved passages into prompts.

The server only knows this protocol; `tinylm.rag` provides the implementation
(`tinylm.rag.load_retriever(index_dir, tokenizer, block_size) -> Retriever`). A request may switch
retrieval off with the extension field `"retrieval": false`; responses carry the passages used in
the extension field `"sources"`: [{"file", "passage", "score"}, ...].
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tinylm.errors import TinyLMError
from tinylm.tokenizer import Tokenizer


class Retriever(Protocol):
    """Adds retrieved passages to a prompt."""

    def augment(self, query: str, prompt: str, max_new_tokens: int) -> tuple[str, list[dict]]:
        """(prompt with the passages for `query` added, packed by tinylm.rag's rule so the context keeps
        room for the answer of max_new_tokens; their sources)."""
        ...


def load_retriever(index_dir: str | Path, tokenizer: Tokenizer, block_size: int) -> Retriever:
    """The retriever over INDEX_DIR, from tinylm.rag."""
    try:
        from tinylm import rag
    except ImportError:
        raise TinyLMError("--index needs tinylm.rag, which this installation lacks.") from None
    if not hasattr(rag, "load_retriever"):
        raise TinyLMError("--index needs tinylm.rag.load_retriever, which this version of tinylm.rag lacks.")
    return rag.load_retriever(index_dir, tokenizer, block_size)
