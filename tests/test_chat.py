"""Chat templates come from GGUF files: render them faithfully, and safely."""

import pytest

from mtllm_locally import ChatTemplate, InvalidRequestError, TemplateError


def test_renders_the_models_template(tiny_engine):
    text = tiny_engine.render([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_system_message_replaces_default(tiny_engine):
    text = tiny_engine.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                              add_generation_prompt=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_content_parts_are_joined(tiny_engine):
    a = tiny_engine.render([{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}])
    b = tiny_engine.render([{"role": "user", "content": "Hello"}])
    assert a == b


def test_encode_chat_uses_special_tokens(tiny_engine):
    ids = tiny_engine.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 1  # <|im_start|> as one special token, not text
    assert ids.count(2) == 2  # two <|im_end|>


@pytest.mark.parametrize("messages", [[], [{"role": "wizard", "content": "x"}], ["hello"],
                                      [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                                      [{"role": "user", "content": 42}]])
def test_bad_messages(tiny_engine, messages):
    with pytest.raises(InvalidRequestError):
        tiny_engine.render(messages)


def test_sandbox_blocks_attribute_escape():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError, match="unsafe"):
        ChatTemplate(evil).render([{"role": "user", "content": "x"}])


def test_sandbox_blocks_mutation_of_messages():
    evil = "{% set _ = messages.append({'role': 'user', 'content': 'injected'}) %}{{ messages|length }}"
    with pytest.raises(TemplateError, match="unsafe"):
        ChatTemplate(evil).render([{"role": "user", "content": "x"}])


def test_template_raise_exception_becomes_template_error():
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        t.render([{"role": "user", "content": "x"}])


def test_syntax_error_in_template():
    with pytest.raises(TemplateError, match="does not parse"):
        ChatTemplate("{% for x in %}")


def test_tojson_does_not_html_escape():
    t = ChatTemplate("{{ tools | tojson }}")
    assert t.render([{"role": "user", "content": "x"}], tools=[{"a": "<b>&"}]) == '[{"a": "<b>&"}]'


def test_missing_template_falls_back_to_chatml():
    t = ChatTemplate(None)
    assert t.is_fallback
    assert t.render([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
