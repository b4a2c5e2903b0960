"""The LM Evaluation Harness adapter: scoring helpers, and a real offline harness run on a local task."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tinylm.checkpoint import load_run
from tinylm.evaluate import evaluate_tokens
from tinylm.generate import generate
from tinylm.harness import continuation_logprob, rolling_logprob


def test_continuation_logprob_matches_log_softmax(tiny_run):
    run = load_run(tiny_run)
    ctx, cont = run.tokenizer.encode("ROMEO: I"), run.tokenizer.encode(" am")
    score, greedy = continuation_logprob(run.model, ctx, cont)
    with torch.no_grad():
        expected, ids = 0.0, list(ctx)
        for t in cont:
            expected += F.log_softmax(run.model(torch.tensor([ids]))[0, -1], -1)[t].item()
            ids.append(t)
    assert score == pytest.approx(expected, abs=1e-4) and isinstance(greedy, bool)


def _naive_logprob(model, context, continuation):
    """Each continuation token's log-probability after the (at most block_size) tokens before it."""
    block, ids, total, greedy = model.cfg.block_size, list(context), 0.0, True
    with torch.no_grad():
        for t in continuation:
            logprobs = F.log_softmax(model(torch.tensor([ids[-block:]]))[0, -1], -1)
            total, greedy = total + logprobs[t].item(), greedy and int(logprobs.argmax()) == t
            ids.append(t)
    return total, greedy


@pytest.mark.numerics
@pytest.mark.parametrize("context_chars, continuation_chars", [(8, 53), (70, 53), (70, 5), (1, 32), (40, 1)])
def test_continuation_longer_than_the_context_is_scored_token_by_token(
    tiny_run, shakespeare_text, context_chars, continuation_chars
):
    """The tiny run's context is 32 tokens; a 53-token continuation used to fail with a size mismatch."""
    run = load_run(tiny_run)
    ids = run.tokenizer.encode(shakespeare_text[1000 : 1000 + context_chars + continuation_chars])
    ctx, cont = ids[:context_chars], ids[context_chars:]
    score, greedy = continuation_logprob(run.model, ctx, cont)
    expected, expected_greedy = _naive_logprob(run.model, ctx, cont)
    # float32 log-softmax over 65 logits per token, summed over <= 53 tokens: rounding far below 1e-3
    assert score == pytest.approx(expected, abs=1e-3) and greedy == expected_greedy


def test_rolling_logprob_is_total_nll(tiny_run):
    run = load_run(tiny_run)
    ids = run.tokenizer.encode("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 2)
    start = run.tokenizer.eot_id
    assert rolling_logprob(run.model, ids, start) == pytest.approx(
        -evaluate_tokens(run.model, [start] + ids, block_size=32).nll
    )


def test_real_harness_run_on_a_local_task(tiny_run, tmp_path, monkeypatch, shakespeare_text):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import tinylm.harness  # noqa: F401  registers "tinylm"

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lines = [l for l in shakespeare_text[:100_000].splitlines() if len(l) > 30][:12]
    docs = [
        {"question": l[:15], "choices": [l[15:30], lines[(i + 5) % len(lines)][15:30]], "answer": 0}
        for i, l in enumerate(lines)
    ]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "toy.yaml").write_text(
        "task: tinylm_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'toy.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    results = lm_eval.simple_evaluate(
        model="tinylm",
        model_args=f"run={tiny_run}",
        tasks=["tinylm_toy"],
        task_manager=TaskManager(include_path=str(tmp_path)),
    )
    # the reference: the harness's multiple-choice rule (context, " " + choice), scored here token by token
    run = load_run(tiny_run)
    enc = run.tokenizer.encode
    correct = []
    for d in docs:
        scores = [_naive_logprob(run.model, enc(d["question"]), enc(" " + c))[0] for c in d["choices"]]
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == d["answer"]))
    acc = results["results"]["tinylm_toy"]["acc,none"]
    assert acc == pytest.approx(sum(correct) / len(correct), abs=1e-12) and 0 < acc < 1
    lm = tinylm.harness.TinyLMEval(run=str(tiny_run))
    out = lm.generate_until([SimpleNamespace(args=("ROMEO:", {"until": ["\n"], "max_gen_toks": 10}))])
    expected = generate(run.model, run.tokenizer, "ROMEO:", max_new_tokens=10, do_sample=False, stop=["\n"])
    assert out == [expected[0].text]
