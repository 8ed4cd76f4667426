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
from tokenizers import Tokenizer

from contract.errors import InputError, ManifestError
from runtime import bounded_jinja


def check_prompt_text(prompt: object, tokenizer: Tokenizer, max_seq_len: int) -> str:
    """Refuse a prompt before anything else looks at it; returns it unchanged. In order, each cheap:

    - not a str;
    - longer than `max_prompt_chars`: certainly more tokens than the export takes, refused before the
      tokenizer sees it (a 50 MB prompt takes 13.8 GB inside the tokenizer);
    - not encodable as UTF-8: lone surrogates, which is how Python hands over command-line bytes that are
      not UTF-8 (`--prompt $'caf\\xe9'`), or "\\ud800" through the API.
    """
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a str, got {type(prompt).__name__} {prompt!r:.80}")
    limit = max_prompt_chars(tokenizer, max_seq_len)
    if len(prompt) > limit:
        raise InputError(f"the prompt has {len(prompt)} characters; this export takes at most {max_seq_len} tokens, "
                         f"at most {limit} characters with its tokenizer: shorten the prompt")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(prompt[exc.start])
        what = (f"byte 0x{bad - 0xDC00:02x} that is not UTF-8" if 0xDC80 <= bad <= 0xDCFF
                else f"lone surrogate U+{bad:04X}")
        raise InputError(f"the prompt has a {what} at character {exc.start}: give UTF-8 text") from None
    return prompt


def refuse_control_tokens(prompt: str, tokenizer: Tokenizer) -> None:
    """Refuse a prompt containing any added token of the tokenizer (`<|im_start|>`, `<|im_end|>`, the image
    placeholder, ...): the tokenizer would read it as that control token, not as text, which lets user text
    close its turn and open a system one (role injection). Refused rather than escaped: transformers'
    `apply_chat_template` would tokenise it as the control token too, so there is no reference to match."""
    for token in control_tokens(tokenizer):
        if token in prompt:
            raise InputError(f"the prompt contains the tokenizer's control token {token!r}, which would be read as "
                             "that token rather than as text: remove it")


@lru_cache(maxsize=8)
def max_prompt_chars(tokenizer: Tokenizer, max_seq_len: int) -> int:
    """max_seq_len x the longest vocabulary entry in characters: a longer prompt cannot fit in max_seq_len
    tokens, as no token covers more characters of the text than its vocabulary entry has (byte-level entries
    have one character per byte, SentencePiece ones one per character; byte-fallback entries more)."""
    return max_seq_len * max((len(entry) for entry in tokenizer.get_vocab(with_added_tokens=False)), default=1)


@lru_cache(maxsize=8)
def control_tokens(tokenizer: Tokenizer) -> tuple[str, ...]:
    """Every added token's text (special or not): the tokenizer matches these before anything else."""
    return tuple(sorted({token.content for token in tokenizer.get_added_tokens_decoder().values() if token.content}))


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
    try:  # bounded in time and size (runtime/bounded_jinja.py): the template comes from an untrusted manifest
        return bounded_jinja.render(
            compiled, messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **extra
        )
    except _TemplateRaised as exc:
        raise InputError(f"the chat template refused the conversation: {_one_line(exc)}") from None
    except bounded_jinja.TemplateTooCostly as exc:
        raise ManifestError(f"the manifest's chat template is refused: {_one_line(exc)}; re-export") from None
    except Exception as exc:  # anything the template's code raises (undefined names, 1/0, sandbox refusals)
        raise ManifestError(f"the manifest's chat template fails to render ({type(exc).__name__}: "
                            f"{_one_line(exc)}): re-export") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


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
    environment = bounded_jinja.BoundedEnvironment(  # an ImmutableSandboxedEnvironment, bounded
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ManifestError(f"chat template does not parse: line {exc.lineno}: {_one_line(exc.message)}") from None
    except RecursionError:
        raise ManifestError("chat template does not parse: nested too deeply") from None


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as `apply_chat_template` hands it to the template: None values dropped, reasoning aliased."""
    if not isinstance(message, dict):
        raise InputError(f"chat messages must be dicts, got {type(message).__name__}: {message!r:.80}")
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message
