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
