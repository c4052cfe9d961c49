import pytest

from vllm_obtain.core.templates import ChatTemplateError, render_chat_prompt

# SmolLM2-135M-Instruct's template, as its GGUF metadata carries it.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_smollm2_template_renders_chatml_with_default_system_prompt():
    prompt = render_chat_prompt(SMOLLM2, [{"role": "user", "content": "Hi"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_generation_prompt_is_left_out_when_not_asked():
    prompt = render_chat_prompt(
        SMOLLM2, [{"role": "system", "content": "S"}], add_generation_prompt=False
    )
    assert prompt == "<|im_start|>system\nS<|im_end|>\n"


def test_trim_blocks_and_lstrip_blocks_like_transformers():
    # trim_blocks eats the newline after a block tag; lstrip_blocks the indent before one.
    template = "{% for m in messages %}\n    {% if m %}{{ m.content }}{% endif %}\n{% endfor %}"
    assert render_chat_prompt(template, [{"role": "user", "content": "a"}]) == "a"


def test_bos_and_eos_tokens_are_available_to_the_template():
    template = "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
    prompt = render_chat_prompt(
        template, [{"role": "user", "content": "x"}], bos_token="<s>", eos_token="</s>"
    )
    assert prompt == "<s>x</s>"


def test_tojson_does_not_html_escape_like_hf():
    template = "{{ messages[0] | tojson }}"
    prompt = render_chat_prompt(template, [{"role": "user", "content": "<b>&é"}])
    assert prompt == '{"role": "user", "content": "<b>&é"}'


def test_raise_exception_becomes_chat_template_error():
    template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(ChatTemplateError, match="must alternate"):
        render_chat_prompt(template, [{"role": "user", "content": "x"}])


def test_generation_tag_and_loop_controls_are_accepted():
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    )
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_chat_prompt(template, messages) == "U"


def test_strftime_now_is_available():
    assert len(render_chat_prompt("{{ strftime_now('%Y') }}", [])) == 4


def test_template_cannot_escape_the_sandbox():
    with pytest.raises(ChatTemplateError):
        render_chat_prompt("{{ ''.__class__.__mro__ }}", [])


def test_broken_template_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_prompt("{% for %}", [])
