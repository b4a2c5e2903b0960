"""The CLI end to end: every command's --json summary, and one clear sentence for each user error."""

import json

import pytest

from tinylm.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def test_prepare_train_generate_eval_info(capsys, tmp_path, shakespeare_slice):
    code, out, _ = run(capsys, "prepare", shakespeare_slice, "--out", tmp_path / "d", "--json")
    assert code == 0 and last_json(out)["train_tokens"] == 90_000
    code, out, _ = run(
        capsys,
        "train",
        "--data",
        tmp_path / "d",
        "--preset",
        "tiny",
        "--max-steps",
        30,
        "--out",
        tmp_path / "r",
        "--no-progress",
        "--json",
    )
    summary = last_json(out)
    assert code == 0 and summary["steps"] == 30 and summary["tokens_per_sec"] > 0 and summary["val_loss"] < 4
    args = (
        "generate",
        tmp_path / "r",
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        20,
        "--seed",
        3,
        "--no-progress",
        "--json",
    )
    code, out, _ = run(capsys, *args)
    first = last_json(out)
    assert code == 0 and first["tokens"] == 20 and out.startswith("ROMEO:")
    assert last_json(run(capsys, *args)[1])["text"] == first["text"]  # same seed, same text
    code, out, _ = run(capsys, "eval", tmp_path / "r", "--no-progress", "--json")
    ev = last_json(out)
    assert (
        code == 0
        and ev["perplexity"] == pytest.approx(2.718281828 ** ev["loss"], rel=1e-6)
        and ev["tokens"] == 9_999
    )
    code, out, _ = run(capsys, "info", tmp_path / "r", "--json")
    assert code == 0 and last_json(out)["tensors"] == 36


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prepare", "nope.txt", "--out", "{tmp}/o"], "is not a file"),
        (["train", "--data", "{tmp}", "--out", "{tmp}/r"], "not a prepared data directory"),
        (["train", "--data", "{data}", "--preset", "huge", "--out", "{tmp}/r"], "Unknown preset"),
        (["train", "--data", "{data}", "--set", "colour=blue", "--out", "{tmp}/r"], "Unknown config key"),
        (["train", "--data", "{data}", "--set", "n_layer=two", "--out", "{tmp}/r"], "not a valid int"),
        (
            ["train", "--data", "{data}", "--set", "block_size=20000", "--out", "{tmp}/r"],
            "shorter than one context window",
        ),
        (["generate", "{tmp}"], "not a tinylm run directory"),
        (["generate", "{run}", "--prompt", "日本"], "outside this model's vocabulary"),
        (["generate", "{run}", "--top-p", "1.5"], "top_p"),
        (["generate", "{run}", "--device", "cuda"], "no CUDA GPU"),
        (["eval", "{tmp}/missing"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_sentence(capsys, tmp_path, char_data, tiny_run, argv, message):
    argv = [a.format(tmp=tmp_path, data=char_data, run=tiny_run) for a in argv]
    code, out, err = (
        run(capsys, *argv, "--no-progress")
        if argv[0] in ("train", "generate", "eval")
        else run(capsys, *argv)
    )
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_corpus_shorter_than_context(capsys, tmp_path):
    (tmp_path / "short.txt").write_text("a tiny corpus\n" * 3)
    assert run(capsys, "prepare", tmp_path / "short.txt", "--out", tmp_path / "d")[0] == 0
    code, _, err = run(capsys, "train", "--data", tmp_path / "d", "--out", tmp_path / "r", "--no-progress")
    assert code == 2 and "shorter than one context window" in err


def test_run_dir_without_weights(capsys, tiny_run, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    shutil.rmtree(broken / "checkpoints")
    code, _, err = run(capsys, "generate", broken, "--no-progress")
    assert code == 2 and "no checkpoint" in err


def test_eval_of_a_run_without_data_asks_for_it(capsys, tiny_run, tmp_path):
    import shutil

    run_dir = tmp_path / "imported"
    shutil.copytree(tiny_run, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "data": None}))
    code, _, err = run(capsys, "eval", run_dir, "--no-progress")
    assert code == 2 and "pass --data DIR or --text FILE" in err


def test_session_summary_counts_this_sessions_steps_and_stop_after_says_how_to_resume(
    capsys, char_data, tmp_path
):
    argv = ["train", "--data", char_data, "--out", tmp_path / "r", "--max-steps", 20, "--no-progress"]
    code, out, _ = run(capsys, *argv, "--stop-after", 8)
    assert code == 0 and out.splitlines()[-2].startswith("Trained 8 steps in")
    assert f"Stopped at step 8 of 20; continue with: tinylm train --resume {tmp_path / 'r'}" in out
    code, out, _ = run(capsys, "train", "--resume", tmp_path / "r", "--no-progress", "--json")
    summary = last_json(out)
    assert code == 0 and summary["session_steps"] == 12 and summary["steps"] == 20
    assert "Trained 12 steps (steps 9-20 of 20)" in out and "(last step)" in out and "Stopped" not in out


def test_output_to_a_file_gets_plain_progress_lines(char_data, tmp_path):
    import os
    import subprocess
    import sys

    def tinylm(*args: str) -> tuple[str, str]:
        proc = subprocess.run(  # bytes, not text=True: universal newlines would turn "\r" into "\n"
            [sys.executable, "-m", "tinylm", *args],
            capture_output=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        out, err = proc.stdout.decode(), proc.stderr.decode()
        assert proc.returncode == 0, err
        assert "\r" not in out + err  # no carriage-return redraws off a terminal
        return out, err

    _, err = tinylm(
        "train",
        "--data",
        str(char_data),
        "--out",
        str(tmp_path / "r"),
        "--max-steps",
        "20",
        "--device",
        "cpu",
    )
    lines = [line for line in err.splitlines() if line.startswith("Training: ")]
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("Training: 20/20 (100%)")
    out, _ = tinylm("generate", str(tmp_path / "r"), "--max-new-tokens", "40")
    assert out.strip()
    tinylm(
        "export", str(tmp_path / "r"), "--format", "hf", "--out", str(tmp_path / "hf")
    )  # transformers' bars


def test_device_has_one_default_on_every_command():
    from tinylm.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    defaults = {
        name: action.default
        for name, sub in commands.items()
        for action in sub._actions
        if "--device" in action.option_strings
    }
    assert {"train", "finetune", "eval", "generate", "chat"} <= set(defaults)
    assert set(defaults.values()) == {"auto"}


def test_exit_code_comes_from_the_exception_type(capsys, monkeypatch):
    import tinylm.cli as cli
    from tinylm.train import TrainingInterrupted

    def interrupted(args):
        raise TrainingInterrupted("Interrupted at step 3.", 15)

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), interrupted))
    code, _, err = run(capsys, "info")
    assert code == 143 and err == "error: Interrupted at step 3.\n"


def _with_func(parser, func):
    parser._subparsers._group_actions[0].choices["info"].set_defaults(func=func)
    return parser


def test_version(capsys):
    import torch

    import tinylm

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"tinylm {tinylm.__version__} (PyTorch {torch.__version__}")


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["trian"], "Did you mean 'train'?"),
        (["prepare", "x.txt", "--out", "o", "--tokenizer", "chr"], "Did you mean 'char'?"),
        (["info", "--preset", "cpu-lama"], "Did you mean 'cpu-llama'?"),
        (["info", "--preset", "tiny", "--set", "n_layers=3"], "Did you mean 'n_layer'?"),
        (
            ["train", "--data", "{data}", "--set", "batchsize=4", "--out", "{tmp}/r"],
            "Did you mean 'batch_size'?",
        ),
    ],
)
def test_typos_get_did_you_mean(capsys, tmp_path, char_data, argv, hint):
    argv = [a.format(tmp=tmp_path, data=char_data) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors (commands, choices) exit 2 with usage
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and hint in err and "Traceback" not in err


def _value_options():
    """(command, option, formatted help) for every option that takes a value."""
    import argparse

    from tinylm.cli import build_parser
    from tinylm.cli.common import HelpFormatter

    commands = build_parser()._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        for action in sub._actions:
            if action.option_strings and action.nargs != 0 and not action.required:
                yield name, action.option_strings[-1], HelpFormatter(name)._get_help_string(action)
            assert not isinstance(action, argparse._StoreTrueAction) or action.help, (name, action.dest)


# inputs whose absence is its own meaning, not a default value
INPUTS = {"--data", "--resume", "--set", "--index", "--rerank-run", "--tokenizer", "--run", "--text"}


def test_help_shows_every_default(capsys):
    missing = [(c, o, h) for c, o, h in _value_options() if o not in INPUTS and "default" not in h]
    assert not missing
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR peak learning rate (default: the preset's)" in text
    assert (
        "(default tiny, a test-sized model" in text and "--out OUT run directory (default runs/run)" in text
    )


def test_train_and_info_name_the_preset(capsys, char_data, tmp_path):
    code, out, _ = run(
        capsys,
        "train",
        "--data",
        char_data,
        "--out",
        tmp_path / "r",
        "--max-steps",
        2,
        "--no-progress",
        "--json",
    )
    assert code == 0 and out.startswith(
        "Preset tiny (the default, a test-sized model; choose a recipe with --preset"
    )
    assert last_json(out)["preset"] == "tiny"
    code, out, _ = run(capsys, "info", tmp_path / "r", "--json")
    assert (
        out.startswith(f"Run {tmp_path / 'r'} (preset tiny): GPT-style")
        and last_json(out)["preset"] == "tiny"
    )
    code, out, _ = run(capsys, "info", "--preset", "cpu-llama")
    assert out.splitlines()[:2] == [
        "Preset cpu-llama: LLaMA-style (RoPE, RMSNorm, SwiGLU; qk_norm), 4 layers x 128, 4 heads, context 64",
        "38 trainable tensors, 861,440 parameters (vocabulary 65)",
    ]
    code, out, _ = run(capsys, "info", "--json")  # nothing to describe: every preset, one line each
    from tinylm.config import PRESETS

    assert code == 0 and set(last_json(out)["presets"]) == set(PRESETS)
    assert out.startswith("Presets (`tinylm info --preset NAME` for one; train uses tiny without --preset):")


def test_advice_for_an_existing_run_is_a_command_that_works(capsys, char_data, tmp_path):
    """The old advice went in a circle: train said "resume it", resume said "it finished"."""
    import shlex

    argv = ["train", "--data", char_data, "--out", tmp_path / "r", "--max-steps", 6, "--no-progress"]
    assert run(capsys, *argv, "--stop-after", 3)[0] == 0
    code, _, err = run(capsys, *argv)  # a stopped run: continue it
    advice = err.split("continue it with: ")[1].split(",")[0]
    assert code == 2 and advice == f"tinylm train --resume {tmp_path / 'r'}"
    assert run(capsys, *shlex.split(advice)[1:], "--no-progress")[0] == 0
    code, _, err = run(capsys, *argv)  # a finished run: train it longer
    assert code == 2 and "already holds a finished run (6 of 6 steps)" in err
    advice = err.split("train it longer with: ")[1].rstrip(".\n").replace("N (N > 6)", "8")
    code, out, _ = run(capsys, *shlex.split(advice)[1:], "--no-progress", "--json")
    assert code == 0 and last_json(out)["steps"] == 8
