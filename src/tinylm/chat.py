"""The one chat template: how a conversation becomes prompt text for a model trained without one.

`tinylm chat`, `tinylm serve`'s /v1/chat/completions and JSONL fine-tuning on {"messages": [...]} all
render conversations through `render_chat`, so a model fine-tuned on chats is prompted exactly the
way it was trained. The template is plain text, so it works with character and BPE vocabularies:

    System: You are terse.        (only when there is a system message)

    User: Who loves Juliet?
    Assistant: Romeo.
    User: And who is he?
    Assistant:

Each turn is one "Role: content" line; the model's reply follows "Assistant:" and ends where it starts
a new "\\nUser:" line (`CHAT_STOP`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from tinylm.config import SampleConfig
from tinylm.errors import TinyLMError

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ("\nUser:",)  # where a generated assistant turn ends


def _turn(message: Mapping[str, object]) -> str:
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise TinyLMError(f"chat message role {role!r} is not one of {', '.join(ROLES)}.")
    if not isinstance(content, str):
        raise TinyLMError(f"chat message content must be a string, not {type(content).__name__}.")
    return f"{ROLES[role]}: {content.strip()}"


def render_chat(messages: Sequence[Mapping[str, object]]) -> str:
    """Prompt text for `messages` ({"role", "content"} dicts), ending with "Assistant:" for the reply."""
    if not messages:
        raise TinyLMError("a chat needs at least one message.")
    system = [m for m in messages if m.get("role") == "system"]
    turns = [m for m in messages if m.get("role") != "system"]
    head = "".join(_turn(m) + "\n\n" for m in system)
    return head + "".join(_turn(m) + "\n" for m in turns) + f"{ROLES['assistant']}:"


def split_chat(messages: Sequence[Mapping[str, object]]) -> tuple[str, str]:
    """(prompt, response) for fine-tuning: the last message must be the assistant's reply."""
    if not messages or messages[-1].get("role") != "assistant":
        raise TinyLMError('a chat example must end with an "assistant" message (the response to learn).')
    reply = _turn(messages[-1])[len(ROLES["assistant"]) + 1 :]  # " content", after "Assistant:"
    return render_chat(messages[:-1]), reply + CHAT_STOP[0][:1]


# `tinylm chat`'s settings commands: name -> (SampleConfig field, type)
SETTINGS = {"/temp": ("temperature", float), "/top_k": ("top_k", int), "/top_p": ("top_p", float)}
SETTINGS["/max"] = ("max_new_tokens", int)
HELP = (
    "type a message; /temp 0.8, /top_k 50, /top_p 0.9, /max 200 change settings; /reset forgets the "
    "conversation; Ctrl-C stops a reply (the conversation stays); Ctrl-D or /quit leaves."
)


@dataclass
class ChatSession:
    """A conversation and its sampling settings; the CLI reads the lines, streams the replies and prints."""

    cfg: SampleConfig  # sampling for every reply; stop includes CHAT_STOP
    messages: list[dict[str, str]] = field(default_factory=list)

    def command(self, line: str) -> str | None:
        """Apply a settings command (/temp 0.8, /reset, ...): the line to show, or None if `line` is a message."""
        word, _, value = line.strip().partition(" ")
        if word == "/reset":
            self.messages.clear()
            return "(conversation cleared)"
        if word not in SETTINGS:
            return None
        name, kind = SETTINGS[word]
        try:
            self.cfg = replace(self.cfg, **{name: kind(value)})
        except (ValueError, TinyLMError) as exc:
            return f"error: {exc}"
        return f"{name} = {getattr(self.cfg, name)}"

    def prompt(self, text: str) -> str:
        """The model's prompt for the user's next message: the whole conversation, then "Assistant:"."""
        return render_chat([*self.messages, {"role": "user", "content": text}])

    def add(self, text: str, reply: str) -> None:
        """Record a turn: the user's message and the reply as far as it went (all of it, or up to Ctrl-C)."""
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.strip()}]

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "assistant")
