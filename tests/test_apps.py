"""Batched generation, the tutorial's applications, chat and attention maps."""

import importlib
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from conftest import tiny_config
from tinylm import apps
from tinylm.chat import CHAT_STOP, render_chat
from tinylm.checkpoint import load_run
from tinylm.config import APP_SAMPLING, SampleConfig
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

    def spy(model, tok, prompt, cfg=None, **kw):
        seen.append((prompt, cfg))
        return real(model, tok, prompt, cfg, **kw)

    monkeypatch.setattr(apps, "generate", spy)
    story = apps.generate_story(run.model, run.tokenizer, "a king", max_new_tokens=10, seed=0)
    assert story.startswith("Write a short story about a king. Once upon a time,")
    real_line = apps.first_line
    monkeypatch.setattr(
        apps, "first_line", lambda m, t, p, cfg: seen.append((p, cfg)) or real_line(m, t, p, cfg)
    )
    answer = apps.answer_question(run.model, run.tokenizer, "Who art thou?", max_new_tokens=10, seed=0)
    assert seen[-1][0] == "Q: Who art thou?\nA:" and "\n" not in answer and seen[-1][1].stop == ("\n",)
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
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["turns"] == 1 and summary["messages"][0] == {"role": "user", "content": "ROMEO:"}
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


FLAGS = [
    *("--max-new-tokens", "3", "--temperature", "0.5", "--top-k", "7", "--top-p", "0.9"),
    *("--repetition-penalty", "1.3", "--seed", "5", "--stop", "\\n\\n", "--stop", "xy"),
]
GIVEN = SampleConfig(
    max_new_tokens=3, temperature=0.5, top_k=7, top_p=0.9, repetition_penalty=1.3, seed=5, stop=("\n\n", "xy")
)
COMMANDS = {
    "generate": ["generate", "{run}", "--prompt", "ROMEO:", "--no-progress"],
    "generate --stream": ["generate", "{run}", "--prompt", "ROMEO:", "--stream"],
    "complete": ["complete", "{run}", "ROMEO:"],
    "story": ["story", "{run}", "a king"],
    "ask": ["ask", "{run}", "Who?"],
    "chat": ["chat", "{run}"],
}


def _sample_configs_used(monkeypatch, capsys, argv: list[str]) -> list[SampleConfig]:
    """Run a CLI command in-process; the SampleConfigs that reached the one decode path."""
    gen = importlib.import_module("tinylm.generate")  # the package's `generate` is the function
    from tinylm.cli import main

    seen, real = [], gen.generate_tokens

    def spy(model, idx, cfg, *args, **kwargs):
        seen.append(cfg)
        return real(model, idx, cfg, *args, **kwargs)

    monkeypatch.setattr(gen, "generate_tokens", spy)  # the one decode loop under every command
    monkeypatch.setattr(apps, "generate_tokens", spy)  # ask's first_line calls it by name
    lines = iter(["Who loves Juliet?"])
    monkeypatch.setattr("builtins.input", lambda prompt="": _next_or_eof(lines))
    assert main(argv) == 0
    capsys.readouterr()
    return seen


def _next_or_eof(lines):
    try:
        return next(lines)
    except StopIteration:
        raise EOFError from None


@pytest.mark.parametrize("command", COMMANDS)
def test_every_sampling_flag_reaches_the_decoder_on_every_command(command, tiny_run, monkeypatch, capsys):
    argv = [a.format(run=tiny_run) for a in COMMANDS[command]]
    (cfg,) = _sample_configs_used(monkeypatch, capsys, argv + FLAGS)
    expected = replace(GIVEN, stop=CHAT_STOP + GIVEN.stop) if command == "chat" else GIVEN
    assert cfg == expected
    (cfg,) = _sample_configs_used(monkeypatch, capsys, argv + ["--greedy", "--max-new-tokens", "2"])
    assert not cfg.do_sample


@pytest.mark.parametrize("command", ["complete", "story", "ask"])
def test_apps_keep_their_own_defaults_unless_a_flag_is_given(command, tiny_run, monkeypatch, capsys):
    argv = [a.format(run=tiny_run) for a in COMMANDS[command]]
    (cfg,) = _sample_configs_used(monkeypatch, capsys, argv)
    assert cfg == APP_SAMPLING[command]  # e.g. ask: temperature 0.7, one line
    (cfg,) = _sample_configs_used(monkeypatch, capsys, argv + ["--temperature", "1.5"])
    assert cfg == replace(APP_SAMPLING[command], temperature=1.5)


def test_generate_defaults_are_sample_config_defaults(tiny_run, monkeypatch, capsys):
    (cfg,) = _sample_configs_used(monkeypatch, capsys, ["generate", str(tiny_run), "--no-progress"])
    assert cfg == SampleConfig()


def test_chat_renders_the_conversation_and_stops_at_the_next_user_turn(tiny_run, monkeypatch, capsys):
    gen = importlib.import_module("tinylm.generate")  # the package's `generate` is the function
    from tinylm.cli import main

    prompts, real = [], gen.encode_prompt
    monkeypatch.setattr(gen, "encode_prompt", lambda tok, p, n: prompts.append(p) or real(tok, p, n))
    lines = iter(["Who loves Juliet?", "And who is he?"])
    monkeypatch.setattr("builtins.input", lambda prompt="": _next_or_eof(lines))
    assert main(["chat", str(tiny_run), "--max-new-tokens", "20", "--seed", "0", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["turns"] == 2
    assert prompts[0] == render_chat([{"role": "user", "content": "Who loves Juliet?"}])
    reply = prompts[1][len(prompts[0]) : -len("\nUser: And who is he?\nAssistant:")].strip()
    assert reply and "\nUser:" not in reply and reply in out  # the printed reply ended before a new turn
    assert prompts[1] == render_chat(
        [
            {"role": "user", "content": "Who loves Juliet?"},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "And who is he?"},
        ]
    )


def _first_non_empty_line(text: str) -> str:
    return next((line.strip() for line in text.split("\n") if line.strip()), "")


def _newline_prone(model, tokenizer, boost: float) -> None:
    """Raise the newline's logit: the model then often starts an answer on a new line, as trained ones do."""
    newline = torch.zeros(tokenizer.vocab_size)
    newline[tokenizer.encode("\n")[0]] = boost
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits + newline)


def test_ask_answers_with_the_first_non_empty_line(tiny_run):
    """A model's answer often starts with a newline (the old default stop): skip blank lines, keep the first."""
    run = load_run(tiny_run)
    _newline_prone(run.model, run.tokenizer, 2.0)
    prompt = apps.QA_PROMPT.format(question="Who art thou?")
    led_by_a_newline = 0
    for seed in range(8):
        sampling = dict(max_new_tokens=30, temperature=1.0, top_k=0, seed=seed)
        full = generate(run.model, run.tokenizer, prompt, **sampling)[0].text  # no stop: all of it
        answer = apps.answer_question(run.model, run.tokenizer, "Who art thou?", **sampling)
        assert answer == _first_non_empty_line(full)
        led_by_a_newline += full.startswith("\n") and bool(answer)
    assert led_by_a_newline  # the case the old answer came back empty for


def test_rag_answer_is_the_first_non_empty_line(tiny_run):
    from tinylm.rag import Passage, answer

    tok = load_run(tiny_run).tokenizer
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.vocab_size, block_size=128)).eval()  # room for a passage
    _newline_prone(model, tok, 3.5)  # an untrained model that often starts with a blank line
    passage = Passage("play.txt", 1, "ROMEO: I am here.", 1.0)
    answers, led_by_a_newline = [], 0
    for seed in range(12):
        result = answer(model, tok, None, "Who?", passages=[passage], do_sample=True, seed=seed)
        assert "ROMEO: I am here." in result.prompt
        full = generate(model, tok, result.prompt, max_new_tokens=32, seed=seed)[0].text
        assert result.text == _first_non_empty_line(full)
        answers.append(result.text)
        led_by_a_newline += full.startswith("\n") and bool(result.text)
    assert any(answers) and led_by_a_newline
