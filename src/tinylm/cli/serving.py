"""Serving and retrieval: serve, index, and ask with --index."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tinylm.cli.common import add_device, sampling_options
from tinylm.errors import TinyLMError


def add_serve(sub: argparse._SubParsersAction) -> None:
    """`tinylm serve`."""
    from tinylm.config import ServeConfig

    d = ServeConfig()
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server and web playground for a run")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--checkpoint", default="last", help="checkpoint name (default last)")
    add_device(p)
    p.add_argument("--model-name", help="model id clients send (default: the run directory's name)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=d.max_batch,
        help=f"sequences decoded together in one step (default {d.max_batch})",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help=f"sequences allowed to wait; more get HTTP 429 (default {d.max_queue})",
    )
    limits = p.add_argument_group("request limits (a request over one gets HTTP 4xx naming it)")
    for flag, name, what in (
        ("--max-body-bytes", "max_body_bytes", "request body size in bytes; larger gets HTTP 413"),
        ("--max-prompt-tokens", "max_prompt_tokens", "tokens per prompt; 0 = the model's context"),
        (
            "--max-tokens-limit",
            "max_tokens",
            "largest max_tokens a request may ask for (may pass the context)",
        ),
        ("--max-n", "max_n", "choices per request (n x prompts)"),
        ("--max-logprobs", "max_logprobs", "log-probability alternatives per token"),
        ("--max-stop", "max_stop", "stop strings per request"),
        ("--max-stop-chars", "max_stop_chars", "characters per stop string"),
    ):
        limits.add_argument(
            flag, type=int, default=getattr(d, name), dest=name, help=f"{what} (default {getattr(d, name)})"
        )
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per request to stderr")
    p.add_argument("--index", help="retrieval index (tinylm index --out) to add passages to prompts")
    p.set_defaults(func=cmd_serve, keep_cores=1)  # a core for the event loop and the engine's thread


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from tinylm.serve import bind, load_app, run_app
    except ImportError:
        raise TinyLMError('tinylm serve needs FastAPI and uvicorn: pip install -e ".[serve]".') from None
    from tinylm.config import ServeConfig, field_names

    limits = ServeConfig(**{name: getattr(args, name) for name in field_names(ServeConfig)})
    sock = bind(args.host, args.port)  # a taken port fails here, before anything says it serves
    try:
        app = load_app(args.run_dir, args.checkpoint, args.device, args.model_name, limits, args.index)
    except BaseException:
        sock.close()
        raise
    url = f"http://{args.host}:{args.port}"
    print(f"Serving {args.run_dir} at {url}: playground at {url}/, OpenAI API at {url}/v1 (Ctrl-C stops)")
    sys.stdout.flush()
    run_app(app, sock, access_log=not args.no_access_log)
    return {"url": url, "run_dir": args.run_dir}


def add_index(sub: argparse._SubParsersAction) -> None:
    """`tinylm index`."""
    p = sub.add_parser("index", help="split documents into passages and build a BM25 index for tinylm ask")
    p.add_argument("docs", nargs="+", metavar="DOCS", help="text file or directory of .txt/.md files")
    p.add_argument("--out", required=True, help="index directory to create (must not exist)")
    p.add_argument("--run", help="run directory whose tokenizer and context size cap the passages")
    p.add_argument("--tokenizer", help="tokenizer.json to cap passages with (instead of --run)")
    p.add_argument(
        "--passage-tokens",
        type=int,
        help="cap per passage in tokens (default with --run: 3/4 of the context divided by --k)",
    )
    p.add_argument("--k", type=int, default=3, help="passages meant to fit one prompt (default 3)")
    p.add_argument("--k1", type=float, default=1.5, help="BM25 term-frequency saturation (default 1.5)")
    p.add_argument("--b", type=float, default=0.75, help="BM25 length normalization (default 0.75)")
    p.set_defaults(func=cmd_index)


def cmd_index(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.rag import build_index, default_passage_tokens, index_tokenizer

    tokenizer = index_tokenizer(args.run, args.tokenizer)
    cap = args.passage_tokens
    if cap is None:
        if args.run is None:
            raise TinyLMError(
                "With --tokenizer, give --passage-tokens N (with --run it follows the context)."
            )
        from tinylm.checkpoint import RunRecord

        cap = default_passage_tokens(RunRecord.read(Path(args.run)).model.block_size, args.k)
    meta = build_index(args.docs, args.out, tokenizer, cap, k1=args.k1, b=args.b)
    print(
        f"Indexed {meta['passages']:,} passages (at most {cap} tokens each) from {len(meta['files'])} "
        f"file(s) into {args.out}"
    )
    return {"out": args.out, **meta}


def register(sub: argparse._SubParsersAction) -> None:
    """Add this family's commands."""
    add_serve(sub)
    add_index(sub)


def add_rag_flags(p: argparse.ArgumentParser) -> None:
    """`tinylm ask --index DIR --k N`: answer from retrieved passages (tinylm.rag)."""
    p.add_argument("--index", help="answer from passages retrieved from this index (built by tinylm index)")
    p.add_argument("--k", type=int, default=3, help="passages to retrieve with --index (default 3)")
    p.add_argument(
        "--rerank",
        action="store_true",
        help="order the retrieved passages by the model's likelihood of the question given each",
    )
    p.add_argument("--keep", type=int, help="with --rerank: keep only the best N passages (default all k)")
    p.add_argument(
        "--rerank-run",
        help="with --rerank: score with this run (same tokenizer, e.g. the base of a fine-tune)",
    )


def cmd_ask_rag(args: argparse.Namespace) -> dict[str, Any]:
    from tinylm.checkpoint import load_run
    from tinylm.rag import Index, answer
    from tinylm.runtime import resolve_device
    from tinylm.tokenizer import tokenizer_hash

    if not args.text.strip():
        raise TinyLMError("The question is empty; ask something.")
    if (args.keep is not None or args.rerank_run) and not args.rerank:
        raise TinyLMError("--keep and --rerank-run apply to re-ranking; add --rerank.")
    index = Index.load(args.index)
    run = load_run(args.run_dir, args.checkpoint, resolve_device(args.device))
    index.check_tokenizer(run.tokenizer)
    options = sampling_options(args)  # greedy unless the user asks for sampling
    if options.keys() & {"temperature", "top_k", "top_p"}:
        options.setdefault("do_sample", True)
    reranker = None
    if args.rerank_run:
        reranker = load_run(args.rerank_run, "last", resolve_device(args.device))
        if tokenizer_hash(reranker.tokenizer) != tokenizer_hash(run.tokenizer):
            raise TinyLMError(
                f"--rerank-run {args.rerank_run} has another tokenizer than {args.run_dir}; "
                "re-rank with a run that shares it (e.g. the fine-tune's base run)."
            )
    result = answer(
        run.model,
        run.tokenizer,
        index,
        args.text,
        k=args.k,
        rerank=args.rerank,
        keep=args.keep,
        rerank_model=reranker.model if reranker else None,
        **options,
    )
    print(result.text)
    print(result.sources_line(run.model.cfg.block_size))
    for i, p in enumerate(result.sources, start=1):
        excerpt = p.text if len(p.text) <= 80 else p.text[:77] + "..."
        rerank = "" if p.likelihood is None else f", question log-likelihood {p.likelihood:.2f}/token"
        print(f"  [{i}] {p.file} passage {p.passage_no} (score {p.score:.2f}{rerank}): {excerpt}")
    return {"text": result.text, **result.summary()}
