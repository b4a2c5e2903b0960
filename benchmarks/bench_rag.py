"""Retrieval-augmented generation measured end to end on an invented reading-comprehension set.

Pipeline (every model step through the real `tinylm` CLI):
  1. scripts/make_rag_set.py: invented people (1500 by default, 3 facts each), documents, train/test
     questions (60 test people held out). So many people that each fact is seen only a few times: the
     model cannot answer from memory and has to learn to read (with 300 people it memorised the
     training facts and copied held-out answers badly, most of all among k=3 passages);
  2. `tinylm prepare` + `tinylm train` (3 layers, 96 wide, context 96, lr 3e-3): a small base model on
     the training people's paragraphs and their questions in the RAG template, answered from the gold
     passage and from all their facts in a random order (a 1024-token BPE trained on that text);
  3. `tinylm index` over all documents (test people included), capped with the base run's tokenizer;
  4. `tinylm finetune` (lr 2e-3) on prompt/response pairs in the RAG template: each training question
     with its gold passage, and with k=3 retrieved passages in retrieval order and shuffled (held-out
     people's passages left out);
  5. on the held-out questions: retrieval recall@1/@3, and exact-match accuracy with retrieval
     (k=1, k=3), without retrieval, with the gold passage (the ceiling), and with the k=3 passages
     re-ranked by the base run's likelihood of the question (best one kept).

    python benchmarks/bench_rag.py [--work DIR] [--people 1500] [--base-steps 400] [--ft-steps 900]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from make_rag_set import make_set  # noqa: E402
from tinylm.rag import RAG_TEMPLATE, Index, Passage, build_prompt, rerank_passages  # noqa: E402

MODEL = {"n_layer": 3, "n_head": 4, "n_embd": 96, "block_size": 96, "dropout": 0.0}
MAX_NEW_TOKENS = 16  # answers are one invented word


def tinylm(*args: str) -> dict[str, Any]:
    """Run the real CLI (`python -m tinylm ... --json`) and return its JSON summary."""
    cmd = [sys.executable, "-m", "tinylm", *args, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def base_corpus(set_dir: Path, out: Path, seed: int) -> None:
    """The training people's paragraphs, then their questions in the RAG template, answered: once with
    the gold passage, once with all the person's facts in a random order (the skill k=3 needs)."""
    rng = random.Random(seed)
    qa = read_jsonl(set_dir / "qa_train.jsonl")
    facts: dict[str, list[str]] = {}
    for q in qa:
        facts.setdefault(q["person"], []).append(q["passage"])
    examples = []
    for q in qa:
        mixed = rng.sample(facts[q["person"]], len(facts[q["person"]]))
        for context in (q["passage"], "\n".join(mixed)):
            examples.append(RAG_TEMPLATE.format(context=context, question=q["question"]) + f" {q['answer']}")
    rng.shuffle(examples)
    text = (set_dir / "train_docs.txt").read_text(encoding="utf-8") + "\n" + "\n\n".join(examples) + "\n"
    out.write_text(text, encoding="utf-8")


def gold(q: dict[str, Any]) -> Passage:
    return Passage(q["file"], -1, q["passage"])


def finetune_pairs(
    index: Index,
    qa: list[dict[str, Any]],
    tokenizer: Any,
    block_size: int,
    k: int,
    seed: int,
    held_out: frozenset[str] = frozenset(),
) -> list[dict[str, str]]:
    """Each training question with its gold passage, with the first 2..k retrieved passages (gold
    ensured) in retrieval order, and with the k shuffled. Passages in `held_out` (the test people's)
    never enter a prompt."""
    rng = random.Random(seed)
    pairs = []
    for q in qa:
        hits = [h for h in index.search(q["question"], k + 3) if h.text not in held_out][:k]
        if not any(h.text == q["passage"] for h in hits):
            hits = [*hits[: k - 1], gold(q)]
        for passages in ([gold(q)], *(hits[:n] for n in range(2, k + 1)), rng.sample(hits, len(hits))):
            prompt = build_prompt(q["question"], passages, tokenizer, block_size, MAX_NEW_TOKENS)
            pairs.append({"prompt": prompt, "response": f" {q['answer']}"})
    rng.shuffle(pairs)
    return pairs


def exact_match(model: Any, tokenizer: Any, qa: list[dict[str, Any]], contexts: list[list[Passage]]) -> float:
    """Share of questions whose greedy answer line equals the gold answer."""
    from tinylm.generate import generate

    block = model.cfg.block_size
    prompts = [build_prompt(q["question"], c, tokenizer, block, MAX_NEW_TOKENS) for q, c in zip(qa, contexts)]
    outs = generate(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, stop=("\n",))
    return sum(o.text.strip() == q["answer"] for o, q in zip(outs, qa)) / len(qa)


def measure(run_dir: Path, base_dir: Path, index: Index, qa: list[dict[str, Any]]) -> dict[str, float]:
    """Recall@1/@3 and exact match with k=1, 2, 3, no retrieval and the gold passage; with the k=3
    passages in reverse order (does the model find the answer, or copy from the first passage?); and
    with the k=3 passages re-ranked by the base run (the fine-tune, trained on answers only, no longer
    models questions), best one kept."""
    from tinylm.checkpoint import load_run

    run, base = load_run(run_dir), load_run(base_dir)
    hits = {k: [index.search(q["question"], k) for q in qa] for k in (1, 2, 3)}
    recall = {
        k: sum(any(h.text == q["passage"] for h in hs) for q, hs in zip(qa, hits[k])) / len(qa)
        for k in (1, 3)
    }
    ranked = [rerank_passages(base.model, base.tokenizer, q["question"], hs) for q, hs in zip(qa, hits[3])]
    em = {
        "k=1": exact_match(run.model, run.tokenizer, qa, hits[1]),
        "k=2": exact_match(run.model, run.tokenizer, qa, hits[2]),
        "k=3": exact_match(run.model, run.tokenizer, qa, hits[3]),
        "k=3 best last": exact_match(run.model, run.tokenizer, qa, [h[::-1] for h in hits[3]]),
        "k=3 rerank keep 1": exact_match(run.model, run.tokenizer, qa, [r[:1] for r in ranked]),
        "none": exact_match(run.model, run.tokenizer, qa, [[] for _ in qa]),
        "gold": exact_match(run.model, run.tokenizer, qa, [[gold(q)] for q in qa]),
    }
    block = run.model.cfg.block_size
    reach = {
        name: sum(
            q["answer"] in build_prompt(q["question"], c, run.tokenizer, block, MAX_NEW_TOKENS)
            for q, c in zip(qa, ctx)
        )
        / len(qa)
        for name, ctx in (("k=3", hits[3]), ("none", [[] for _ in qa]))
    }
    return {
        "recall@1": recall[1],
        "recall@3": recall[3],
        "rerank@1": sum(r[0].text == q["passage"] for q, r in zip(qa, ranked) if r) / len(qa),
        **{f"answer in prompt {k}": v for k, v in reach.items()},
        **{f"em {k}": v for k, v in em.items()},
    }


def pipeline(
    work: Path, people: int, test_people: int, base_steps: int, ft_steps: int, vocab: int, seed: int
) -> dict[str, Any]:
    """Run every step into `work` and return the figures with the time each step took."""
    times: dict[str, float] = {}
    start = time.perf_counter()
    set_dir = work / "set"
    make_set(set_dir, people=people, test_people=test_people, seed=seed)
    base_corpus(set_dir, work / "base.txt", seed)
    tinylm(
        "prepare",
        str(work / "base.txt"),
        "--tokenizer",
        "bpe",
        "--vocab-size",
        str(vocab),
        "--out",
        str(work / "data"),
        "--val-fraction",
        "0.05",
    )
    times["data"] = time.perf_counter() - start
    sets = [f"--set={k}={v}" for k, v in MODEL.items()]
    t = time.perf_counter()
    base = tinylm(
        "train",
        "--data",
        str(work / "data"),
        *sets,
        "--max-steps",
        str(base_steps),
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--set",
        "warmup_steps=50",
        "--eval-interval",
        str(base_steps),
        "--seed",
        str(seed),
        "--device",
        "cpu",
        "--out",
        str(work / "base"),
        "--no-progress",
    )
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    tinylm("index", str(set_dir / "docs"), "--run", str(work / "base"), "--out", str(work / "index"))
    from tinylm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(work / "base" / "tokenizer.json")
    index = Index.load(work / "index", tokenizer)
    held_out = frozenset(q["passage"] for q in read_jsonl(set_dir / "qa_test.jsonl"))
    train_qa = read_jsonl(set_dir / "qa_train.jsonl")
    pairs = finetune_pairs(index, train_qa, tokenizer, MODEL["block_size"], 3, seed, held_out)
    with open(work / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    times["index"] = time.perf_counter() - t
    t = time.perf_counter()
    ft = tinylm(
        "finetune",
        str(work / "base"),
        "--data",
        str(work / "pairs.jsonl"),
        "--max-steps",
        str(ft_steps),
        "--batch-size",
        "16",
        "--lr",
        "2e-3",
        "--seed",
        str(seed),
        "--device",
        "cpu",
        "--out",
        str(work / "ft"),
        "--no-progress",
    )
    times["finetune"] = time.perf_counter() - t
    t = time.perf_counter()
    figures = measure(work / "ft", work / "base", index, read_jsonl(set_dir / "qa_test.jsonl"))
    times["eval"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - start
    return {
        **figures,
        "base_val_loss": base.get("val_loss"),
        "ft_val_loss": ft.get("val_loss"),
        "passages": len(index),
        "test_questions": len(read_jsonl(set_dir / "qa_test.jsonl")),
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }


def table(r: dict[str, Any]) -> str:
    """The figures as a Markdown table."""
    gold_em = r["em gold"] or float("nan")
    lines = [
        "| measure | value |",
        "|---|---|",
        f"| retrieval recall@1 | {r['recall@1']:.3f} |",
        f"| retrieval recall@3 | {r['recall@3']:.3f} |",
        f"| exact match, retrieval k=1 | {r['em k=1']:.3f} ({r['em k=1'] / gold_em:.0%} of gold) |",
        f"| exact match, retrieval k=2 | {r['em k=2']:.3f} ({r['em k=2'] / gold_em:.0%} of gold) |",
        f"| exact match, retrieval k=3 | {r['em k=3']:.3f} ({r['em k=3'] / gold_em:.0%} of gold) |",
        f"| exact match, no retrieval | {r['em none']:.3f} |",
        f"| exact match, gold passage (ceiling) | {r['em gold']:.3f} |",
        f"| exact match, k=3 in reverse order (best passage last) | {r['em k=3 best last']:.3f} |",
        f"| exact match, k=3 re-ranked by the base run, best 1 kept | {r['em k=3 rerank keep 1']:.3f} |",
        f"| re-ranked top passage is the gold one | {r['rerank@1']:.3f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="working directory to create (default: a temporary one)")
    parser.add_argument(
        "--people", type=int, default=1500, help="invented people, 3 facts each (default 1500)"
    )
    parser.add_argument(
        "--test-people", type=int, default=60, help="people held out for testing (default 60: 180 questions)"
    )
    parser.add_argument("--base-steps", type=int, default=400, help="tinylm train steps (default 400)")
    parser.add_argument("--ft-steps", type=int, default=900, help="tinylm finetune steps (default 900)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the set, the training and the pairs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per process (default 1: on a shared machine more is slower)",
    )
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT / "src"))
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the CLI subprocesses inherit it
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp) / "rag"
        result = pipeline(
            work, args.people, args.test_people, args.base_steps, args.ft_steps, args.vocab_size, args.seed
        )
    print(table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
