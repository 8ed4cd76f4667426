"""Chat prompts without transformers: render a Hugging Face chat template the way `apply_chat_template` does.

The template and the special tokens come from the manifest; the conversation is built here. Rendering copies
transformers 5.23 `utils/chat_template_utils.py`: an ImmutableSandboxedEnvironment with trim_blocks and
lstrip_blocks, the loopcontrols extension, a `tojson` that does not escape HTML, `raise_exception`,
`strftime_now`, and a `{% generation %}` tag that renders its body (transformers uses it only to mark
assistant tokens for training masks).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
from jinja2.sandbox import ImmutableSandboxedEnvironment

from contract.errors import InputError, ManifestError

# Message fields a reasoning text may come under; transformers copies it to the first (and to "thinking").
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def user_message(prompt: str, num_images: int = 1, content_type: str = "image") -> list[dict[str, Any]]:
    """A one-turn conversation: `num_images` blocks of `content_type` ("image", "video"), then the text, the
    order LLaVA's processor uses."""
    if num_images < 0:
        raise InputError(f"num_images must be 0 or more, got {num_images}")
    content: list[dict[str, Any]] = [{"type": content_type} for _ in range(num_images)]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Render `messages` with a chat template, equal to transformers' `apply_chat_template(..., tokenize=False)`.

    `extra` are further template variables; pass the tokenizer's special tokens (`bos_token`, `eos_token`, ...)
    here, as `apply_chat_template` passes `special_tokens_map`. As there, keys whose value is None are dropped
    from each message and a reasoning text is also offered under `reasoning_content` and `thinking`. The
    template's `raise_exception` (e.g. "roles must alternate") becomes an InputError; a template that does
    not parse is a ManifestError. Tools, documents and `continue_final_message` are not supported.
    """
    compiled = _compile(template)
    chat = [_template_message(message) for message in messages]
    try:
        return compiled.render(
            messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **extra
        )
    except _TemplateRaised as exc:
        raise InputError(f"the chat template refused the conversation: {exc}") from None


class _TemplateRaised(Exception):
    """What `raise_exception` raises inside a template; turned into an InputError by `render_chat_template`."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders the body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """transformers' `tojson`: plain `json.dumps`, without Jinja's HTML escaping and with non-ASCII kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """Compile once per template string (the runtime renders the same template for every request)."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ManifestError(f"chat template does not parse: line {exc.lineno}: {exc.message}") from None


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as `apply_chat_template` hands it to the template: None values dropped, reasoning aliased."""
    if not isinstance(message, dict):
        raise InputError(f"chat messages must be dicts, got {type(message).__name__}: {message!r:.80}")
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message
