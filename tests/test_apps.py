"""Batched generation, the tutorial's applications, chat and attention maps."""

import json
import subprocess
import sys

import torch

from conftest import tiny_config
from tinylm import apps
from tinylm.checkpoint import load_run
from tinylm.generate import generate
from tinylm.model import Transformer
from tinylm.tokenizer import CharTokenizer
from tinylm.viz import generation_attention, visualize_generation_attention


def test_batched_prompts_of_different_lengths_match_one_by_one(tiny_run):
    run = load_run(tiny_run)
    prompts = ["ROMEO:", "To be", "JULIET: O", "KING:"]
    batched = generate(run.model, run.tokenizer, prompts, max_new_tokens=20, do_sample=False)
    single = [generate(run.model, run.tokenizer, p, max_new_tokens=20, do_sample=False)[0] for p in prompts]
    assert [g.prompt for g in batched] == prompts
    assert [g.text for g in batched] == [g.text for g in single]
    many = generate(run.model, run.tokenizer, "A", max_new_tokens=20, num_samples=3, seed=1)
    assert len(many) == 3 and len({g.text for g in many}) > 1


def test_apps_use_the_tutorial_prompts(tiny_run, monkeypatch):
    run = load_run(tiny_run)
    seen = []
    real = apps.generate

    def spy(model, tok, prompt, **kw):
        seen.append((prompt, kw))
        return real(model, tok, prompt, **kw)

    monkeypatch.setattr(apps, "generate", spy)
    story = apps.generate_story(run.model, run.tokenizer, "a king", max_new_tokens=10, seed=0)
    assert story.startswith("Write a short story about a king. Once upon a time,")
    answer = apps.answer_question(run.model, run.tokenizer, "Who art thou?", max_new_tokens=10, seed=0)
    assert seen[-1][0] == "Q: Who art thou?\nA:" and "\n" not in answer and seen[-1][1]["stop"] == ("\n",)
    assert apps.complete_text(run.model, run.tokenizer, "ROMEO:", max_new_tokens=5, seed=0).startswith(
        "ROMEO:"
    )


def test_attention_from_generation_is_causal_and_normalised():
    torch.manual_seed(0)
    tok = CharTokenizer("abcdefgh ")
    model = Transformer(tiny_config(vocab_size=tok.vocab_size)).eval()
    context, generated, steps = generation_attention(model, tok, "abc def", n_tokens=3)
    assert context == list("abc def") and len(generated) == 3
    for i, w in enumerate(steps):
        assert w.shape == (
            2,
            4,
            len(context) + i,
        )  # (layers, heads, positions so far): nothing from the future
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4))
    # the recorded path generates the same tokens as normal greedy decoding
    assert "".join(generated) == generate(model, tok, "abc def", max_new_tokens=3, do_sample=False)[0].text


def test_attention_png(tiny_run, tmp_path):
    run = load_run(tiny_run)
    path = visualize_generation_attention(run.model, run.tokenizer, "ROMEO:", 3, tmp_path / "a.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_chat_loop_and_app_commands(tiny_run):
    script = "ROMEO:\n/temp 0.5\n/temp -1\n/quit\n"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tinylm",
            "chat",
            str(tiny_run),
            "--max-new-tokens",
            "10",
            "--seed",
            "1",
            "--json",
        ],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "temperature = 0.5" in out.stdout and "error: temperature (-1.0)" in out.stdout
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"turns": 1}
    for command, arg in (("story", "a king"), ("ask", "Who?"), ("complete", "ROMEO:")):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tinylm",
                command,
                str(tiny_run),
                arg,
                "--max-new-tokens",
                "8",
                "--seed",
                "0",
                "--json",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and "text" in json.loads(out.stdout.strip().splitlines()[-1])
