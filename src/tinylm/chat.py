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
