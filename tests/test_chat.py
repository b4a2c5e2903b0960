import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from tinylm.chat import CHAT_STOP, render_chat, split_chat
from tinylm.errors import TinyLMError


def test_render_chat_is_the_documented_template():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Who loves Juliet?"},
        {"role": "assistant", "content": "Romeo."},
        {"role": "user", "content": "And who is he?"},
    ]
    assert render_chat(messages) == (
        "System: You are terse.\n\nUser: Who loves Juliet?\nAssistant: Romeo.\nUser: And who is he?\nAssistant:"
    )
    assert CHAT_STOP == ("\nUser:",)


def test_split_chat_gives_the_prompt_the_model_will_see():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    prompt, response = split_chat(messages)
    assert prompt == render_chat(messages[:1]) == "User: Hi\nAssistant:"
    assert response == " Hello.\n"


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}]],
)
def test_bad_messages_are_one_sentence(messages):
    with pytest.raises(TinyLMError):
        render_chat(messages)


def test_split_chat_needs_a_reply():
    with pytest.raises(TinyLMError, match="assistant"):
        split_chat([{"role": "user", "content": "Hi"}])


def test_chat_session_keeps_turns_and_settings():
    from tinylm.chat import ChatSession
    from tinylm.config import SampleConfig

    session = ChatSession(SampleConfig(stop=CHAT_STOP))
    assert session.command("Who loves Juliet?") is None  # a message, not a command
    assert session.command("/temp 0.5") == "temperature = 0.5" and session.cfg.temperature == 0.5
    assert session.command("/temp -1").startswith("error: temperature (-1.0)")
    session.add("Who loves Juliet?", " Romeo, and")  # a reply stopped by Ctrl-C is kept as far as it got
    assert session.prompt("And who is he?") == render_chat(
        [
            {"role": "user", "content": "Who loves Juliet?"},
            {"role": "assistant", "content": "Romeo, and"},
            {"role": "user", "content": "And who is he?"},
        ]
    )
    assert (
        session.turns == 1 and session.command("/reset") == "(conversation cleared)" and not session.messages
    )


class Terminal:
    """`tinylm chat` on a pseudo-terminal: keys go in as a user types them (Ctrl-C is a real SIGINT from the
    terminal driver), the screen comes out."""

    def __init__(self, argv: list[str]) -> None:
        import pty

        env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            signal.signal(
                signal.SIGINT, signal.SIG_DFL
            )  # as in a terminal, even if pytest runs in a script's background
            os.execve(sys.executable, [sys.executable, "-m", "tinylm", *argv], env)
        self.screen = ""

    def read(self, timeout: float = 0.1) -> str:
        """The screen so far, after waiting at most `timeout` seconds for more (a streaming reply never pauses)."""
        import select

        deadline = time.monotonic() + timeout
        while select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            self.screen += re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", data.decode(errors="replace"))
        return self.screen

    def expect(self, pattern: str, start: int = 0, timeout: float = 300.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.compile(pattern).search(self.read(), start):
                return m
        raise AssertionError(
            f"{pattern!r} did not appear ({self.signals()}); the screen:\n{self.screen[-2000:]}"
        )

    def signals(self) -> str:
        """The chat's blocked, ignored and caught signal masks (/proc), for a failure message."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text().splitlines()
        except OSError:
            return "no /proc"
        return ", ".join(line for line in status if line.startswith(("SigBlk", "SigIgn", "SigCgt")))

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def wait(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.read()
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError("tinylm chat did not exit")


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation_ctrl_d_leaves(tiny_run):
    term = Terminal(
        ["chat", str(tiny_run), "--max-new-tokens", "20000", "--temperature", "1.0", "--seed", "1"]
        + ["--json"]
    )
    term.expect(r"\n> $")
    term.type(b"Who art thou?\r")
    start = term.expect(r"Who art thou\?\r?\n").end()
    term.expect(r"\S.{30}", start)  # the reply is streaming (20,000 tokens would take minutes)
    term.type(b"\x03")  # Ctrl-C, as typed: the terminal sends SIGINT to the chat
    stopped = term.expect(r"\(reply stopped\)\r?\n> $", start)
    partial = term.screen[start : stopped.start()]
    term.type(b"/max 8\r")
    term.expect(r"max_new_tokens = 8\r?\n> $", stopped.end())
    mark = len(term.screen)
    term.type(b"And who art thou?\r")
    term.expect(r"(?s)And who art thou\?\r?\n.*\n> $", mark)  # a whole reply, then the prompt again
    term.type(b"\x03")  # Ctrl-C at the prompt: a hint and a fresh prompt, the chat goes on
    term.expect(r"\(Ctrl-D or /quit leaves\)\r?\n> $", mark)
    term.type(b"\x04")  # Ctrl-D leaves
    assert term.wait() == 0
    summary = json.loads(term.screen.strip().splitlines()[-1])
    messages = summary["messages"]
    assert summary["turns"] == 2 and [m["role"] for m in messages] == ["user", "assistant"] * 2
    assert messages[0]["content"] == "Who art thou?" and messages[2]["content"] == "And who art thou?"
    kept = messages[1]["content"]  # the stopped reply stays in the conversation, as far as it was shown
    # as far as the terminal lets us see: on Ctrl-C it drops output still queued for the screen (ISIG
    # without NOFLSH), and a piece printed as Ctrl-C lands is not kept; so one is the start of the other
    shown = partial.replace("\r", "").replace("^C", "").removesuffix("\n")
    assert len(kept) >= 30 and (kept.startswith(shown) or shown.startswith(kept)), (kept, shown)
    assert len(kept) - len(shown) <= 4096  # at most a pty buffer held back: not the whole 20,000 tokens


def test_quit_leaves(tiny_run):
    term = Terminal(["chat", str(tiny_run), "--json"])
    term.expect(r"\n> $")
    term.type(b"/quit\r")
    assert term.wait() == 0
    assert json.loads(term.screen.strip().splitlines()[-1]) == {"turns": 0, "messages": []}
